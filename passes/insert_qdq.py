"""insert-qdq: place QuantizeLinear/DequantizeLinear nodes for int8 deployment (scales set by `calibrate`)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.errors import UnsupportedModelError
from compiler.passmanager import Option, Pass, register_pass
from compiler.rewrite import add_to_bias, const_value, fresh_name, is_graph_output
from passes.float_layers import float_layers
from passes.prune_common import bias_shift, layer_statistics, rows_to_weight, weight_rows
from passes.quant_common import (ABSORBED_ACTIVATIONS, COMPUTE_OPS, SHARED_SCALE_OPS, add_qdq, gptq_round,
                                 is_weight_input, quantize_weight, weight_axis)

GATE_ACTIVATIONS = {"HardSigmoid", "Sigmoid", "Tanh"}  # float gates after a conv read its int8 output
GPTQ_SAMPLES = 128  # calibration samples whose layer inputs shape the second-order weight rounding
ELEMENTWISE = {"Add", "Mul", "Sigmoid", "HardSwish", "LeakyRelu"}
ALWAYS_FLOAT = {"LSTM", "GRU", "RNN", "If", "Loop", "Scan", "NonMaxSuppression", "TopK"}


@register_pass
class InsertQDQ(Pass):
    """Quantize weights to int8 per channel and mark every activation that int8 ops read or write with Q/DQ.

    Guarantees: weights of Conv/ConvTranspose/Gemm/MatMul become int8 initializers (symmetric, per output
    channel) read through DequantizeLinear with the right axis; each float activation read or written by a
    quantized op gets one uint8 QuantizeLinear→DequantizeLinear pair (placeholder scale 1, zero point 0 until
    `calibrate`); a Relu/Clip right after a quantized op is absorbed into the range of its output (the pair
    goes after it); data-movement ops are quantized only when their input is; ops in the target's
    float_ops, LSTM/GRU/If/Loop, custom-domain ops, nodes matched by --exclude, ops the target runs on the
    CPU and the layers `float_layers` picks (a few-channel stem conv, pooling after HardSwish) stay float;
    graph outputs keep their names and stay float; float readers of a tensor keep reading it unrounded,
    except readers of an int8 conv's own output, which read it dequantized so that onnxruntime fuses the conv
    into QLinearConv. With calibration data, the mean output shift of weight rounding goes into the bias.
    Needs opset >= 13.
    """

    name = "insert-qdq"
    OPTIONS = {"rounding": Option(str, "gptq", "weight rounding: nearest, or gptq (second-order, needs calibration data)",
                                  choices=("nearest", "gptq")),
               "bias_correction": Option(bool, True, "move the mean output shift of weight rounding, (W - Wq) E[x], "
                                         "into the bias (needs calibration data)"),
               "stem": Option(str, "float", "a conv on a model input with at most 4 channels: float (faster in "
                              "onnxruntime) or int8", choices=("float", "int8")),
               "float_tail": Option(bool, True, "keep pooling after a HardSwish float (faster in onnxruntime)")}

    def run(self, module, ctx) -> bool:
        if module.opset < 13:
            raise UnsupportedModelError(f"per-channel QDQ needs opset >= 13 but the model has opset {module.opset}; "
                                        f"put upgrade-opset{{min=13}} before insert-qdq")
        module.infer_shapes()
        if ctx is not None:
            ctx.float_model = module.to_proto()
        graph = module.graph
        chosen, stem_ends = float_layers(graph, stem=self.stem == "float", tail=self.float_tail)
        float_reason = {**self._float_nodes(module, ctx), **chosen}
        quantized = [n for n in graph.nodes if n.name not in float_reason and n.op in COMPUTE_OPS | SHARED_SCALE_OPS]
        stats = {}
        if (self.rounding == "gptq" or self.bias_correction) and ctx is not None and ctx.calib is not None:
            layers = [n for n in quantized if any(is_weight_input(n, i) for i in range(len(n.inputs)))]
            stats = layer_statistics(module, ctx, layers, max_samples=GPTQ_SAMPLES)
        weights = self._quantize_weights(graph, quantized, stats, self.rounding, self.bias_correction)
        tensors = self._activation_tensors(graph, quantized, stem_ends)
        for tensor, readers in tensors:
            add_qdq(graph, tensor, readers=readers)
        graph.toposort()
        if ctx is not None:
            ctx.log(quantized_nodes=len(quantized), quantized_weights=weights, activation_pairs=len(tensors),
                    float_nodes={k: v for k, v in float_reason.items() if v != "not quantizable"})
            for node in quantized:
                ctx.layer(node.name, quantized=True)
            for name, reason in float_reason.items():
                if reason != "not quantizable":
                    ctx.layer(name, quantized=False, float_reason=reason)
        return bool(weights or tensors)

    @staticmethod
    def _float_nodes(module, ctx) -> dict[str, str]:
        exclude = set((ctx.options.get("exclude") or []) if ctx is not None else [])
        target = getattr(ctx, "target", None)
        float_ops = set(getattr(target, "float_ops", ()))
        cpu = {}
        if target is not None:
            from backends.partition import partition

            part = partition(module.to_proto(infer_shapes=True), target)
            cpu = {n: r for n, r in part.reasons.items()}
        reasons = {}
        for node in module.graph.nodes:
            if node.name in exclude or node.op in exclude:
                reasons[node.name] = "excluded by --exclude"
            elif node.op in float_ops:
                reasons[node.name] = f"{node.op} is kept out of quantization on {target.name}"
            elif node.op in ALWAYS_FLOAT or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                reasons[node.name] = f"{node.op} stays float"
            elif (node.domain or "") not in ("", "ai.onnx"):
                reasons[node.name] = f"custom domain {node.domain} stays float"
            elif node.name in cpu and node.op in COMPUTE_OPS:
                reasons[node.name] = f"runs on the CPU: {cpu[node.name]}"
            elif node.op not in COMPUTE_OPS | SHARED_SCALE_OPS:
                reasons[node.name] = "not quantizable"
        return reasons

    @staticmethod
    def _quantize_weights(graph: gs.Graph, quantized: list[gs.Node], stats: dict, rounding: str,
                          bias_correction: bool) -> int:
        count = 0
        for node in quantized:
            for index in range(len(node.inputs)):
                if not is_weight_input(node, index):
                    continue
                weight = node.inputs[index]
                values = np.asarray(weight.values, dtype=np.float32)
                if node.op == "ConvTranspose" and node.attrs.get("group", 1) != 1:
                    continue  # per-channel axis 1 does not cover grouped transposed convs: keep float
                axis = weight_axis(node, values)
                q, scale = quantize_weight(values, axis)
                st = stats.get(node.name) if index == 1 else None
                if st is not None and rounding == "gptq":
                    q = _gptq_weight(node, values, scale, st)
                if st is not None and bias_correction:
                    shape = [1] * values.ndim
                    shape[axis] = -1
                    add_to_bias(graph, node, bias_shift(node, values, q * scale.reshape(shape), st))
                q_const = gs.Constant(fresh_name(graph, weight.name + "_int8"), q)
                s_const = gs.Constant(fresh_name(graph, weight.name + "_wscale"), scale)
                z_const = gs.Constant(fresh_name(graph, weight.name + "_wzero"), np.zeros(scale.shape, np.int8))
                out = gs.Variable(fresh_name(graph, weight.name + "_dequantized"), dtype=np.float32, shape=list(values.shape))
                graph.nodes.append(gs.Node("DequantizeLinear", fresh_name(graph, node.name + "_weight_DequantizeLinear"),
                                           attrs={"axis": axis}, inputs=[q_const, s_const, z_const], outputs=[out]))
                node.inputs[index] = out
                count += 1
        return count

    @staticmethod
    def _activation_tensors(graph: gs.Graph, quantized: list[gs.Node],
                            stem_ends: set[str]) -> list[tuple[gs.Variable, set[str]]]:
        names = {n.name for n in quantized}
        int8: set[str] = set()
        for node in graph.nodes:  # topological: which quantizable nodes actually compute in int8
            if node.name not in names:
                continue
            if node.op in SHARED_SCALE_OPS:
                src = _int8_source(node.inputs[0]) if node.inputs else None
                if src is not None and (src.name in int8 or src.name in stem_ends):
                    int8.add(node.name)
            elif node.op not in ELEMENTWISE or _elementwise_in_int8(node, int8 | stem_ends):
                int8.add(node.name)
        chosen: dict[int, gs.Variable] = {}
        gates: set[str] = set()

        def want(t: gs.Tensor) -> None:
            if (isinstance(t, gs.Variable) and t.name and t.dtype is not None and np.dtype(t.dtype) == np.float32
                    and not is_graph_output(graph, t) and not (t.inputs and t.inputs[0].op == "DequantizeLinear")):
                chosen[id(t)] = t
        # int8 readers read the dequantized tensor; float readers keep the float one (no rounding for them),
        # except readers of an int8 conv's output (see all_read_int8 below)

        for node in graph.nodes:
            if node.name not in int8:
                continue
            if node.op not in SHARED_SCALE_OPS:
                for i, t in enumerate(node.inputs):
                    if not is_weight_input(node, i) and not (node.op in ("Conv", "ConvTranspose", "Gemm") and i == 2):
                        if not isinstance(t, gs.Constant):
                            want(t)
            for out in node.outputs:  # an output is stored as int8 only when an int8 op reads it ...
                stored = _absorbed_output(graph, out)
                if any(r.name in int8 for r in stored.outputs):
                    want(stored)
                elif node.op in ("Conv", "ConvTranspose") and stored.outputs and all(
                        r.op in GATE_ACTIVATIONS for r in stored.outputs):
                    want(stored)  # ... or when a conv feeds only a float gate (SE blocks): the conv runs in int8
                    gates.update(r.name for r in stored.outputs)
        readers = int8 | gates

        def all_read_int8(t: gs.Tensor) -> bool:
            # a float reader of the conv's own output would keep onnxruntime from fusing it into QLinearConv
            src = _int8_source(t)
            return src is not None and src.name in int8 and src.op in ("Conv", "ConvTranspose")

        return [(t, {r.name for r in t.outputs if r.name in readers or all_read_int8(t)}) for t in chosen.values()]


def _int8_source(tensor: gs.Tensor):
    """The node producing `tensor`, looking through an absorbed Relu/Clip."""
    src = tensor.inputs[0] if tensor.inputs else None
    if src is not None and src.op in ABSORBED_ACTIVATIONS and src.inputs and src.inputs[0].inputs:
        return src.inputs[0].inputs[0]
    return src


def _gptq_weight(node: gs.Node, values: np.ndarray, scale: np.ndarray, st) -> np.ndarray:
    """The int8 weight of `node` with GPTQ rounding (per group for grouped Conv)."""
    rows = weight_rows(node, values.astype(np.float64))
    per_group = rows.shape[0] // st.groups
    out = np.empty(rows.shape, dtype=np.int8)
    for g in range(st.groups):
        sl = slice(g * per_group, (g + 1) * per_group)
        out[sl] = gptq_round(rows[sl], st.hessians[g], scale[sl])
    return rows_to_weight(node, out, values.shape)


def _elementwise_in_int8(node: gs.Node, quantized: set[str]) -> bool:
    """Element-wise ops run in int8 only between int8 producers (residual Add, SE gate Mul): a constant
    operand (scales and shifts of a written-out LayerNorm or GELU) or a float producer keeps them float."""
    for t in node.inputs:
        if isinstance(t, gs.Constant) or const_value(t) is not None:
            return False
        src = t.inputs[0] if t.inputs else None
        while (src is not None and src.name not in quantized and src.op in ABSORBED_ACTIVATIONS | SHARED_SCALE_OPS
               and src.inputs and src.inputs[0].inputs):
            if src.op not in ABSORBED_ACTIVATIONS:
                return False
            src = src.inputs[0].inputs[0]
        if src is None or src.name not in quantized:
            return False
    return True


def _absorbed_output(graph: gs.Graph, tensor: gs.Tensor) -> gs.Tensor:
    """The tensor whose range stands for `tensor`: the output of a Relu/Clip that is its only reader."""
    readers = tensor.outputs
    if len(readers) == 1 and readers[0].op in ABSORBED_ACTIVATIONS and not is_graph_output(graph, tensor):
        act = readers[0]
        if act.op == "Clip" and any(len(act.inputs) > i and act.inputs[i].name and not isinstance(act.inputs[i], gs.Constant)
                                    for i in (1, 2)):
            return tensor
        return act.outputs[0]
    return tensor
