"""convert-fp16: produce the fp16 model that first-generation DRP-AI targets run."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxruntime.transformers.float16 import convert_float_to_float16

from compiler.activations import stream_activations
from compiler.errors import UnsupportedModelError
from compiler.passmanager import Pass, register_pass
from compiler.rewrite import bypass
from compiler.runtime import make_session

FP16_MAX = 65504.0
FLOAT = onnx.TensorProto.FLOAT
RANGE_SAMPLES = 16  # calibration samples the range check runs, one at a time (bounded memory)

# Kept in float32: ops whose fp16 kernels are missing in onnxruntime or that need the range.
KEEP_FLOAT = ["Range", "NonMaxSuppression", "TopK", "RoiAlign", "CumSum", "Resize", "Upsample", "If", "Loop",
              "LSTM", "GRU", "RNN", "Softplus", "Exp", "Log", "Pow", "Sqrt", "ReduceMean", "ReduceSum", "LayerNormalization"]


@register_pass
class ConvertFp16(Pass):
    """Convert float32 weights and activations to float16; graph inputs and outputs stay float32.

    Uses onnxruntime's float16 converter (Cast nodes at the borders of float32 islands). Guarantees: the
    model's interface is unchanged (a half-precision model's fp16 inputs and outputs reach the fp16 body
    without a Cast there and back); ops listed in KEEP_FLOAT, custom-domain ops, nodes named in
    ctx.options["exclude"] and nodes whose outputs If/Loop bodies read from the outer scope stay float32.
    A float tensor that reaches past fp16's range (65504) on the calibration data is named in a warning:
    the device overflows there, while onnxruntime's CPU kernels, which run many fp16 ops in float32, can hide
    it from the simulator.
    """

    name = "convert-fp16"

    def run(self, module, ctx) -> bool:
        exclude = set((ctx.options.get("exclude") or []) if ctx is not None else [])
        graph = module.graph
        captured = _outer_scope_names(graph)
        block_nodes = [n.name for n in graph.nodes if n.name in exclude or n.op in exclude or n.domain
                       or any(t.name in captured for t in n.outputs)]
        proto = module.to_proto(infer_shapes=True)
        overflow = _beyond_fp16(proto, ctx.calib) if ctx is not None and ctx.calib is not None else {}
        if overflow:
            name, peak = max(overflow.items(), key=lambda kv: kv[1])
            ctx.warn(f"{len(overflow)} tensors pass fp16's range ({FP16_MAX:g}) on the calibration data, the largest "
                     f"'{name}' at {peak:.3g}: the fp16 model overflows there on the device; scale the model's "
                     f"inputs or weights, or use an int8 target")
        hidden = _hide_subgraphs(proto)
        converted = convert_float_to_float16(proto, keep_io_types=True, op_block_list=KEEP_FLOAT + [OPAQUE],
                                             node_block_list=block_nodes, disable_shape_infer=True)
        _restore_subgraphs(converted, hidden)
        try:
            make_session(converted)
        except Exception as exc:  # the converter's output must load; say which construct broke it
            first = str(exc).strip().splitlines()[0][-160:]
            where = f" (subgraph nodes: {', '.join(sorted(hidden))[:120]})" if hidden else ""
            raise UnsupportedModelError(f"fp16 conversion gives a model onnxruntime refuses{where}: {first}") from None
        module.graph = gs.import_onnx(converted)
        round_trips = _drop_round_trip_casts(module.graph)
        if ctx is not None:
            ctx.log(kept_float_ops=sorted({n.op for n in graph.nodes if n.op in KEEP_FLOAT}), kept_float_nodes=block_nodes,
                    beyond_fp16=sorted(overflow, key=overflow.get, reverse=True)[:20],
                    round_trip_casts_dropped=round_trips)
        return True


def _drop_round_trip_casts(graph: gs.Graph) -> int:
    """Bypass each Cast to fp16 of a value that is fp16 already, directly or through a Cast to float32 (exact:
    every fp16 value is a float32 value), such as a half-precision model's widened interface after the
    converter; returns how many."""
    def half(tensor) -> bool:
        return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float16

    dropped = 0
    for cast in [n for n in graph.nodes if n.op == "Cast" and n.attrs.get("to") == onnx.TensorProto.FLOAT16]:
        source = cast.inputs[0]
        inner = source.inputs[0] if source.inputs else None
        if not half(source) and inner is not None and inner.op == "Cast" and inner.attrs.get("to") == FLOAT:
            source = inner.inputs[0]
        if half(source):
            dropped += bypass(graph, cast, source, cast.outputs[0])
    graph.cleanup(remove_unused_graph_inputs=False)
    return dropped


def _beyond_fp16(proto: onnx.ModelProto, calib) -> dict[str, float]:
    """{tensor: largest |value|} for the float32 node outputs that pass fp16's range on the first calibration
    samples."""
    types = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.value_info) + list(proto.graph.output)}
    names = [o for n in proto.graph.node for o in n.output if types.get(o) == onnx.TensorProto.FLOAT]
    peaks: dict[str, float] = {}
    if not names:
        return peaks
    for values in stream_activations(proto, names, calib, batch_size=1, max_samples=RANGE_SAMPLES):
        for name, v in values.items():
            peak = float(np.max(np.abs(v))) if v.size else 0.0
            if peak > FP16_MAX and peak > peaks.get(name, 0.0):
                peaks[name] = peak
    return peaks


OPAQUE = "DrpcOpaqueSubgraphOp"


def _hide_subgraphs(proto) -> dict[str, tuple]:
    """Turn If/Loop/Scan nodes into opaque placeholders (the converter must not rewrite their float bodies)."""
    hidden = {}
    for node in proto.graph.node:
        graphs = [a for a in node.attribute if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)]
        if not graphs:
            continue
        saved = [onnx.AttributeProto() for _ in node.attribute]
        for copy_, attr in zip(saved, node.attribute):
            copy_.CopyFrom(attr)
        hidden[node.name] = (node.op_type, node.domain, saved)
        del node.attribute[:]
        node.op_type, node.domain = OPAQUE, ""
    return hidden


def _restore_subgraphs(proto, hidden: dict[str, tuple]) -> None:
    """Put the float bodies back; outer-scope reads of a tensor the converter now casts to fp16 are pointed
    at the float tensor before that Cast."""
    float_source = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Cast"
                    and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)}
    for node in proto.graph.node:
        if node.name in hidden:
            node.op_type, node.domain, saved = hidden[node.name]
            del node.attribute[:]
            node.attribute.extend(saved)
            for attr in node.attribute:
                for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    _rename_reads(body, float_source)


def _rename_reads(body, mapping: dict[str, str]) -> None:
    local = {o for n in body.node for o in n.output} | {i.name for i in body.input}
    for n in body.node:
        for i, name in enumerate(n.input):
            if name in mapping and name not in local:
                n.input[i] = mapping[name]
        for attr in n.attribute:
            for inner in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _rename_reads(inner, {k: v for k, v in mapping.items() if k not in local})


def _outer_scope_names(graph: gs.Graph) -> set[str]:
    """Names that subgraphs (If/Loop bodies, at any depth) read without producing them."""
    names: set[str] = set()
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                produced = {t.name for n in value.nodes for t in n.outputs} | {t.name for t in value.inputs}
                used = {t.name for n in value.nodes for t in n.inputs if not isinstance(t, gs.Constant)}
                names |= (used - produced) | _outer_scope_names(value)
    return names
