"""strip-quantization: turn a model some tool already quantized in QDQ form back into the float model it
simulates, so drpc prunes it and quantizes it for the target itself."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from compiler.errors import UnsupportedModelError
from compiler.passmanager import Pass, register_pass
from compiler.rewrite import is_graph_output, replace_uses
from passes.fold_constants import evaluate_nodes

QDQ = {"QuantizeLinear", "DequantizeLinear"}
# Ops whose outputs are never negative: a range starting at 0 after them clips nothing below.
NON_NEGATIVE = {"Relu", "Sigmoid", "Softmax", "HardSigmoid", "Abs", "Exp"}
# Ops whose output is non-negative when their data input is (the others are indices, shapes, scales)...
KEEPS_SIGN_OF_FIRST = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten",
                       "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Resize", "Upsample", "Identity",
                       "DepthToSpace", "SpaceToDepth", "Gather"}
# ... and when all their inputs are.
KEEPS_SIGN_OF_ALL = {"Concat", "Max", "Min"}
INTEGER_RANGE = {np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max))
                 for t in (np.uint8, np.int8, np.uint16, np.int16)}


@register_pass
class StripQuantization(Pass):
    """Turn a model quantized in QDQ form back into the float model it simulates.

    DequantizeLinear of constant weights (integers, or floats through a QuantizeLinear) becomes the float
    weights it gives; each QuantizeLinear → DequantizeLinear pair on an activation becomes the activation
    itself, through a Clip to the pair's range where that range starts at 0 (quantizers drop a Relu or Relu6
    that such a range applies: onnxruntime's does).

    Guarantees: afterwards no QuantizeLinear or DequantizeLinear is left, and every weight holds exactly the
    value the quantized model computed with; the model differs from the quantized one only by the rounding
    and saturation of its activations, which drpc's calibration then chooses anew for the target. A model
    quantized in operator form (QLinearConv, ConvInteger, MatMulInteger, ...), or with a Q/DQ node outside
    such pairs, is refused with an error naming the node. A float model is untouched.
    """

    name = "strip-quantization"
    makes_float_source = True

    def run(self, module, ctx) -> bool:
        graph = module.graph
        if not any(n.op in QDQ or operator_form(n.op) for n in graph.nodes):
            return False
        for node in graph.nodes:
            if operator_form(node.op):
                raise UnsupportedModelError(
                    f"node '{node.name}' ({node.op}): the model is quantized in operator form; drpc takes float or "
                    "QDQ models: give it the float model")
        weights = _dequantize_weights(module, ctx)
        pairs, clips = _bypass_pairs(graph)
        graph.cleanup(remove_unused_graph_inputs=False)
        for node in graph.nodes:
            if node.op in QDQ:
                raise UnsupportedModelError(f"node '{node.name}' ({node.op}) is not part of a QuantizeLinear → "
                                            "DequantizeLinear pair: drpc cannot tell which float model it quantizes")
        if ctx is not None:
            ctx.log(dequantized_weights=weights, activation_pairs=pairs, clips_restored=clips)
            ctx.warn(f"the model was already quantized ({weights} weights, {pairs} activation Q/DQ pairs): drpc "
                     "computes its float weights and quantizes them again for the target, calibrating on the "
                     "calibration data")
        return True


def _dequantize_weights(module, ctx) -> int:
    """Replace every DequantizeLinear computed from constants by its value (onnxruntime evaluates them all in
    one run); returns how many."""
    weights = [n for n in module.graph.nodes if n.op == "DequantizeLinear" and _constant_chain(n)]
    if not weights:
        return 0
    repaired = [n.name for n in weights if _repair_axis(n)]
    if repaired and ctx is not None:
        ctx.warn(f"{len(repaired)} DequantizeLinear nodes name an axis their per-channel scales do not fit "
                 f"('{repaired[0]}'): read along the one axis of that length")
    chains = [node for dq in weights for node in _constant_chain(dq)]
    try:
        values = evaluate_nodes(chains, [n.outputs[0] for n in weights], module.opset_imports)
    except Exception as exc:  # onnxruntime's kernels name the node they refuse
        first = str(exc).strip().splitlines()[0][-300:] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"cannot compute the quantized weights: {first}") from None
    for node, value in zip(weights, values):
        tensor = node.outputs[0]
        node.outputs.clear()
        tensor.to_constant(value)
    return len(weights)


def _bypass_pairs(graph: gs.Graph) -> tuple[int, int]:
    """Make the readers of each activation DequantizeLinear read the float tensor its QuantizeLinear stands
    for; returns (pairs, Clips added)."""
    pairs, float_of = 0, {}  # id(QuantizeLinear) → the float tensor its pairs stand for
    for dq in [n for n in graph.nodes if n.op == "DequantizeLinear" and n.outputs]:
        q = dq.inputs[0].inputs[0] if dq.inputs[0].inputs else None
        if q is None or q.op != "QuantizeLinear":
            raise UnsupportedModelError(f"node '{dq.name}' (DequantizeLinear) does not read a QuantizeLinear or "
                                        "constant weights: drpc cannot tell which float model it quantizes")
        quantized = dq.outputs[0]
        dq.outputs.clear()
        if id(q) not in float_of:
            float_of[id(q)] = (_float_of(graph, q), q.inputs[0])
        source = float_of[id(q)][0]
        replace_uses(quantized, source)
        if is_graph_output(graph, quantized):  # the output keeps its name
            graph.nodes.append(gs.Node("Identity", f"{quantized.name}_float", inputs=[source], outputs=[quantized]))
        pairs += 1
    return pairs, sum(made is not given for made, given in float_of.values())


def _float_of(graph: gs.Graph, q: gs.Node) -> gs.Tensor:
    """The float tensor QuantizeLinear `q`'s pairs stand for: its input, through a new Clip to its range
    when that range starts at 0 and the input can be negative."""
    source = q.inputs[0]
    top = _range_from_zero(q)
    if top is None or _non_negative(source):
        return source
    clipped = gs.Variable(f"{q.name}_clipped", dtype=source.dtype, shape=source.shape)
    bounds = [gs.Constant(f"{q.name}_range_{end}", np.asarray(v, dtype=source.dtype or np.float32))
              for end, v in (("min", 0.0), ("max", top))]
    graph.nodes.append(gs.Node("Clip", f"{q.name}_range", inputs=[source, *bounds], outputs=[clipped]))
    return clipped


def _constant_chain(dq: gs.Node) -> list[gs.Node]:
    """The nodes computing DequantizeLinear `dq`'s weight from constants: [dq] for integer weights, [q, dq]
    for float weights quantized in the graph (NNCF's form); [] when it reads an activation."""
    if _all_constant(dq.inputs):
        return [dq]
    source = dq.inputs[0]
    q = source.inputs[0] if isinstance(source, gs.Variable) and source.inputs else None
    if q is not None and q.op == "QuantizeLinear" and _all_constant(q.inputs) and _all_constant(dq.inputs[1:]):
        return [q, dq]
    return []


def _repair_axis(dq: gs.Node) -> bool:
    """Point a weight DequantizeLinear's `axis` at the one axis its per-channel scale fits, when the axis it
    names does not fit (onnxruntime's quantizer writes axis 0 for a [1, C] bias with C scales); True if
    changed."""
    weight, scale = dq.inputs[0], dq.inputs[1]
    length = np.size(scale.values) if isinstance(scale, gs.Constant) and np.ndim(scale.values) == 1 else 1
    shape = list(np.shape(weight.values)) if isinstance(weight, gs.Constant) else []
    axis = int(dq.attrs.get("axis", 1))
    if length == 1 or not shape or (-len(shape) <= axis < len(shape) and shape[axis] == length):
        return False
    fits = [k for k, size in enumerate(shape) if size == length]
    if len(fits) != 1:
        return False
    dq.attrs["axis"] = fits[0]
    return True


def _all_constant(tensors) -> bool:
    return all(isinstance(t, gs.Constant) or t.name == "" for t in tensors)


def operator_form(op_type: str) -> bool:
    """Whether `op_type` computes on quantized integers itself (QLinearConv, MatMulInteger, ...)."""
    return op_type.startswith("QLinear") or op_type.endswith("Integer") or op_type == "DynamicQuantizeLinear"


def _range_from_zero(q: gs.Node) -> float | None:
    """The top of QuantizeLinear `q`'s float range when that range starts at exactly 0 (its zero point is the
    lowest integer of its type), else None (also for per-channel or computed parameters). A top within one
    step of a whole number is that number: the bound of the Relu6 (Clip 0..6) the range stands for."""
    scale = q.inputs[1]
    zero_point = q.inputs[2] if len(q.inputs) > 2 and q.inputs[2].name else None
    if not isinstance(scale, gs.Constant) or np.size(scale.values) != 1:
        return None
    if zero_point is None:  # zero point 0 of the output type: uint8 unless `output_dtype` says otherwise
        kind = onnx.helper.tensor_dtype_to_np_dtype(q.attrs.get("output_dtype") or onnx.TensorProto.UINT8)
        zp = np.zeros((), dtype=kind)
    elif isinstance(zero_point, gs.Constant) and np.size(zero_point.values) == 1:
        zp = np.asarray(zero_point.values).reshape(())
    else:
        return None
    if zp.dtype not in INTEGER_RANGE or zp != INTEGER_RANGE[zp.dtype][0]:
        return None
    step = float(np.asarray(scale.values).reshape(()))
    top = (INTEGER_RANGE[zp.dtype][1] - int(zp)) * step
    return float(round(top)) if abs(top - round(top)) <= step and round(top) > 0 else top  # Relu6's 6


def _non_negative(tensor: gs.Tensor, depth: int = 8) -> bool:
    """Whether `tensor` can never be negative, by the ops that make it (a Relu, or a pool of one)."""
    node = tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None
    if node is None or depth == 0:
        return False
    if node.op in NON_NEGATIVE:
        return True
    if node.op == "Clip" and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return bool(np.all(np.asarray(node.inputs[1].values) >= 0))
    if node.op == "Pad" and len(node.inputs) > 2 and node.inputs[2].name:
        value = node.inputs[2]
        if not isinstance(value, gs.Constant) or np.any(np.asarray(value.values) < 0):
            return False
    if node.op in KEEPS_SIGN_OF_FIRST or node.op == "Pad":
        return _non_negative(node.inputs[0], depth - 1)
    return node.op in KEEPS_SIGN_OF_ALL and all(_non_negative(t, depth - 1) for t in node.inputs if t.name)
