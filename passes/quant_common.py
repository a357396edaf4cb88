"""What the quantization passes agree on: which ops are quantized, how weights and Q/DQ nodes look."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.rewrite import const_value, fresh_name, replace_uses
from passes.second_order import inverse_hessian_factor

# Ops computed in int8 on DRP-AI (and fused into integer kernels by onnxruntime).
COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "AveragePool", "GlobalAveragePool",
               "Concat", "Sigmoid", "HardSwish", "LeakyRelu", "Resize", "Upsample"}
# Ops that only move or select data: their output shares their input's scale and zero point.
SHARED_SCALE_OPS = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Identity",
                    "Split", "GlobalMaxPool", "DepthToSpace", "SpaceToDepth"}
# Activations absorbed into the range of the tensor they produce (Q clamps to the same interval).
ABSORBED_ACTIVATIONS = {"Relu", "Clip"}
WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def weight_axis(node: gs.Node, weight: np.ndarray) -> int:
    """The output-channel axis of a weight: Conv 0, ConvTranspose 1, Gemm 0 with transB else 1, MatMul last."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return weight.ndim - 1


def quantize_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: returns (int8 values in [-127, 127], float32 scale per channel)."""
    moved = np.moveaxis(weight.astype(np.float64), axis, 0).reshape(weight.shape[axis], -1)
    amax = np.abs(moved).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def gptq_round(rows: np.ndarray, hessian: np.ndarray, scale: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Int8 values for `rows` ([outputs, d], per-row `scale`) rounded column by column with the error of each
    column pushed onto the columns not yet rounded through the Cholesky factor of H⁻¹ (H = Σ x xᵀ of the
    layer input), so the layer output moves less than with rounding to nearest. A weight that is exactly zero
    (pruned) stays zero, so the sparsity the target skips survives; the updates it received move on too."""
    w = rows.astype(np.float64).copy()
    d = w.shape[1]
    pruned = rows == 0
    u, _ = inverse_hessian_factor(hessian, damp)
    s = scale.astype(np.float64)
    q = np.empty_like(w)
    for j in range(d):
        qj = np.where(pruned[:, j], 0.0, np.clip(np.round(w[:, j] / s), -127, 127))
        q[:, j] = qj
        err = (w[:, j] - qj * s) / u[j, j]
        w[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return q.astype(np.int8)


def is_weight_input(node: gs.Node, index: int) -> bool:
    """True for the weight operand of a Conv/ConvTranspose/Gemm/MatMul when it is a constant of rank >= 2."""
    if node.op not in WEIGHT_OPS or index != WEIGHT_OPS[node.op] or index >= len(node.inputs):
        return False
    value = const_value(node.inputs[index])
    return value is not None and value.ndim >= 2 and value.dtype.kind == "f"


def add_qdq(graph: gs.Graph, tensor: gs.Variable, scale: float = 1.0, zero_point: int = 0,
            readers: set[str] | None = None) -> gs.Variable:
    """Insert QuantizeLinear→DequantizeLinear (uint8, per tensor) after `tensor`; the readers named in
    `readers` (default: all) read the DQ output, the others keep reading the float tensor."""
    base = tensor.name
    scale_c = gs.Constant(fresh_name(graph, base + "_scale"), np.array(scale, np.float32))
    zp_c = gs.Constant(fresh_name(graph, base + "_zero_point"), np.array(zero_point, np.uint8))
    q_out = gs.Variable(fresh_name(graph, base + "_quantized"), dtype=np.uint8, shape=tensor.shape)
    dq_out = gs.Variable(fresh_name(graph, base + "_dequantized"), dtype=tensor.dtype, shape=tensor.shape)
    targets = [r for r in tensor.outputs if readers is None or r.name in readers]
    q = gs.Node("QuantizeLinear", fresh_name(graph, base + "_QuantizeLinear"), inputs=[tensor, scale_c, zp_c], outputs=[q_out])
    dq = gs.Node("DequantizeLinear", fresh_name(graph, base + "_DequantizeLinear"), inputs=[q_out, scale_c, zp_c], outputs=[dq_out])
    replace_uses(tensor, dq_out, targets)
    graph.nodes.extend([q, dq])
    return dq_out


def activation_qdq_pairs(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node]]:
    """(QuantizeLinear, DequantizeLinear) pairs on activations: Q reads a non-constant, its only reader is a DQ."""
    pairs = []
    for node in graph.nodes:
        if node.op != "QuantizeLinear" or isinstance(node.inputs[0], gs.Constant):
            continue
        readers = node.outputs[0].outputs
        if len(readers) == 1 and readers[0].op == "DequantizeLinear":
            pairs.append((node, readers[0]))
    return pairs


def set_qparams(graph: gs.Graph, q: gs.Node, dq: gs.Node, scale: float, zero_point: int) -> None:
    """Give a Q/DQ pair its own scale and zero point constants."""
    name = q.inputs[0].name
    scale_c = gs.Constant(fresh_name(graph, name + "_scale"), np.array(scale, np.float32))
    zp_c = gs.Constant(fresh_name(graph, name + "_zero_point"), np.array(zero_point, np.uint8))
    q.inputs[1], q.inputs[2] = scale_c, zp_c
    dq.inputs[1], dq.inputs[2] = scale_c, zp_c
