"""Read quantization parameters back out of a QDQ model: which tensor has which scale and zero point."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def initializer_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs of the main graph, by name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def activation_quant_params(model: onnx.ModelProto) -> dict[str, dict]:
    """For every tensor quantized by a QuantizeLinear: {scale, zero_point, dtype} (per-tensor).

    Both the float tensor entering the QuantizeLinear and the integer tensor leaving it are listed,
    so a descriptor entry for either can be checked against the model.
    """
    consts = initializer_values(model)
    out: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 2:
            continue
        scale = consts.get(node.input[1])
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(0, np.uint8)
        if scale is None or zp is None or scale.size != 1:
            continue
        info = {"scale": float(scale.reshape(-1)[0]), "zero_point": int(zp.reshape(-1)[0]),
                "quant_dtype": np.dtype(zp.dtype).name}
        out.setdefault(node.input[0], info)
        out.setdefault(node.output[0], info)
    return out


def weight_quant_params(model: onnx.ModelProto) -> dict[str, dict]:
    """For every integer initializer read by a DequantizeLinear: {scale (list), zero_point (list), axis, dtype}."""
    consts = initializer_values(model)
    out: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in consts:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        scale = consts.get(node.input[1])
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        out[node.input[0]] = {
            "scale": np.asarray(scale).reshape(-1).tolist() if scale is not None else None,
            "zero_point": np.asarray(zp).reshape(-1).tolist() if zp is not None else [0],
            "axis": axis if scale is not None and scale.size > 1 else None,
            "dtype": consts[node.input[0]].dtype.name,
            "dequantized": node.output[0],
        }
    return out
