"""int8-hardswish: express quantized HardSwish (and HardSigmoid gates) with integer Add and Mul."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Option, Pass, register_pass
from compiler.rewrite import fresh_name, replace_uses
from passes.quant_common import add_qdq


@register_pass
class Int8HardSwish(Pass):
    """Rewrite DQ -> HardSwish -> Q as x * clip(x + 3, 0, 6) / 6 in QDQ form, after calibration.

    hswish(x) = x * clip(x + 3, 0, 6) / 6. The clip is free in uint8: x + 3 quantized with scale 6/255 and
    zero point 0 saturates exactly at 0 and 6, and reading that tensor back with scale 1/255 divides it by 6.
    onnxruntime runs the result as QLinearAdd + QLinearMul instead of dequantizing, computing HardSigmoid
    and Mul in float and quantizing again (it has no int8 HardSwish). With `gates`, a HardSigmoid that gates
    a quantized Mul (squeeze-excitation) is quantized to its exact range [0, 1] with scale 1/255, so that the
    Mul runs as QLinearMul too.

    Guarantees: each rewritten HardSwish output differs from DQ -> HardSwish -> Q by at most one step of the
    gate (1/255 of the input, relative) before the existing output Q; the output tensor keeps its name, Q
    and scale; float readers of a rewritten output read its dequantized value. Needs calibrated scales:
    runs after `calibrate`.
    """

    name = "int8-hardswish"
    OPTIONS = {"gates": Option(bool, True, "also quantize HardSigmoid gates read by a quantized Mul")}

    def run(self, module, ctx) -> bool:
        graph = module.graph
        swishes = [n for n in graph.nodes
                   if n.op == "HardSwish" and _dequantized(n.inputs[0]) and _quantize_reader(n.outputs[0])]
        for node in swishes:
            _rewrite(graph, node)
        gates = _quantize_gates(graph) if self.gates else 0
        if swishes or gates:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if ctx is not None:
            ctx.log(hardswish=len(swishes), gates=gates)
            for node in swishes:
                ctx.layer(node.name, int8_form="QLinearAdd + QLinearMul")
        return bool(swishes or gates)


def _dequantized(tensor: gs.Tensor) -> bool:
    """`tensor` is an activation read back from uint8 (a DQ of a non-constant with per-tensor scale)."""
    dq = tensor.inputs[0] if tensor.inputs else None
    return (dq is not None and dq.op == "DequantizeLinear" and not isinstance(dq.inputs[0], gs.Constant)
            and isinstance(dq.inputs[1], gs.Constant) and np.asarray(dq.inputs[1].values).size == 1
            and np.dtype(dq.inputs[0].dtype) == np.uint8)


def _quantize_reader(tensor: gs.Tensor) -> gs.Node | None:
    return next((r for r in tensor.outputs if r.op == "QuantizeLinear"), None)


def _const(graph: gs.Graph, base: str, value, dtype) -> gs.Constant:
    return gs.Constant(fresh_name(graph, base), np.array(value, dtype))


def _node(graph: gs.Graph, op: str, base: str, inputs: list, dtype=np.float32, shape=None) -> gs.Variable:
    out = gs.Variable(fresh_name(graph, base), dtype=dtype, shape=shape)
    graph.nodes.append(gs.Node(op, fresh_name(graph, base + "_" + op), inputs=inputs, outputs=[out]))
    return out


def _rewrite(graph: gs.Graph, node: gs.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    base = y.name
    zero = _const(graph, base + "_gate_zero_point", 0, np.uint8)
    three = _node(graph, "DequantizeLinear", base + "_three", [_const(graph, base + "_three_q", 1, np.uint8),
                                                              _const(graph, base + "_three_scale", 3.0, np.float32), zero])
    shifted = _node(graph, "Add", base + "_plus3", [x, three], shape=x.shape)
    clipped = _node(graph, "QuantizeLinear", base + "_gate_q",
                    [shifted, _const(graph, base + "_gate_scale", 6 / 255, np.float32), zero], dtype=np.uint8, shape=x.shape)
    gate = _node(graph, "DequantizeLinear", base + "_gate",  # read back divided by 6
                 [clipped, _const(graph, base + "_gate_scale_div6", 1 / 255, np.float32), zero], shape=x.shape)
    q = _quantize_reader(y)
    others = [r for r in y.outputs if r is not q]
    node.op = "Mul"  # keeps the HardSwish's name, so the report ties the Mul to the layer it replaces
    node.attrs.clear()
    node.inputs.clear()
    node.inputs.extend([x, gate])
    if others:  # a float reader would keep onnxruntime from fusing the Mul with its Q
        dq = next((r for r in q.outputs[0].outputs if r.op == "DequantizeLinear"), None)
        read = dq.outputs[0] if dq is not None else _node(graph, "DequantizeLinear", base + "_dequantized",
                                                          [q.outputs[0], q.inputs[1], q.inputs[2]], shape=y.shape)
        replace_uses(y, read, others)


def _quantize_gates(graph: gs.Graph) -> int:
    count = 0
    for mul in list(graph.nodes):
        if mul.op != "Mul" or len(mul.inputs) != 2 or len(mul.outputs[0].outputs) != 1 or not _quantize_reader(mul.outputs[0]):
            continue
        kinds = [t.inputs[0].op if t.inputs else None for t in mul.inputs]
        if sorted(kinds, key=str) != ["DequantizeLinear", "HardSigmoid"]:
            continue
        if _dequantized(mul.inputs[kinds.index("DequantizeLinear")]):
            add_qdq(graph, mul.inputs[kinds.index("HardSigmoid")], scale=1 / 255, zero_point=0, readers={mul.name})
            count += 1
    return count
