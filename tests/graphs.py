"""Builders for small ONNX graphs used by the tests, and a helper to compare two models in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler.runtime import run_model

RNG = np.random.default_rng(0)


def init(name: str, array) -> onnx.TensorProto:
    """An initializer from a numpy array."""
    return numpy_helper.from_array(np.asarray(array), name)


def rand(*shape, scale=1.0) -> np.ndarray:
    """Deterministic float32 normal values."""
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def model(nodes, inputs, outputs, initializers=(), opset=13) -> onnx.ModelProto:
    """A checked ModelProto from nodes and (name, elem_type, shape) input/output triples."""
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    inferred = {v.name: v.type for v in onnx.shape_inference.infer_shapes(m).graph.output}
    for out in m.graph.output:  # outputs given without a shape take the inferred one
        if not out.type.tensor_type.HasField("shape") and out.name in inferred:
            out.type.CopyFrom(inferred[out.name])
    onnx.checker.check_model(m)
    return m


def conv_bn_model(channels=8) -> onnx.ModelProto:
    """x[1,3,16,16] → Conv3x3(+bias) → BatchNorm → Relu → Conv1x1 (no bias) → BatchNorm → y."""
    c = channels
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], name="bn1", epsilon=1e-3),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["y"], name="bn2"),
    ]
    inits = [init("w1", rand(c, 3, 3, 3)), init("b1", rand(c)),
             init("g1", rand(c) + 2), init("be1", rand(c)), init("m1", rand(c)), init("v1", np.abs(rand(c)) + 0.5),
             init("w2", rand(c, c, 1, 1)),
             init("g2", rand(c) + 2), init("be2", rand(c)), init("m2", rand(c)), init("v2", np.abs(rand(c)) + 0.5)]
    return model(nodes, [("x", TensorProto.FLOAT, [1, 3, 16, 16])], [("y", TensorProto.FLOAT, [1, c, 16, 16])], inits)


def outputs_close(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict, rtol=1e-4) -> float:
    """Max relative error between the outputs of two models on `feed` (asserted below `rtol`)."""
    from compiler.instrument import relative_error

    worst = 0.0
    for want, have in zip(run_model(a, feed), run_model(b, feed)):
        worst = max(worst, relative_error(want, have))
    assert worst <= rtol, f"outputs differ by {worst:.3g} relative"
    return worst
