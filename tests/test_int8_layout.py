"""Layout choices that make the int8 model fast in onnxruntime: float stem, float pooling tail, int8 HardSwish.

Each is checked on what onnxruntime actually builds (its optimized graph) and numerically against float.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from compiler.api import compile_model
from compiler.ir import Module
from graphs import init, model, rand
from passes.float_layers import float_layers

PIPELINE = ("upgrade-opset{min=14},fuse-hardswish,insert-qdq,calibrate{method=mse},int8-hardswish,fuse-qdq")


def stem_tail_model(pool_attrs=None):
    """x[1,1,16,16] → stem conv → Relu → MaxPool → conv → HardSwish → conv → HardSwish → MaxPool → GAP → Gemm."""
    pool_attrs = pool_attrs or {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="stem_relu"),
             helper.make_node("MaxPool", ["r0"], ["p0"], name="stem_pool", **pool_attrs),
             helper.make_node("Conv", ["p0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["c1"], ["h1"], name="hswish1"),
             helper.make_node("Conv", ["h1", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("HardSwish", ["c2"], ["h2"], name="hswish2"),
             helper.make_node("MaxPool", ["h2"], ["p2"], name="tail_pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    inits = [init("w0", rand(16, 1, 3, 3)), init("b0", rand(16, scale=0.1)), init("w1", rand(16, 16, 3, 3, scale=0.3)),
             init("b1", rand(16, scale=0.1)), init("w2", rand(16, 16, 1, 1, scale=0.3)), init("b2", rand(16, scale=0.1)),
             init("wf", rand(10, 16)), init("bf", rand(10))]
    return model(nodes, [("x", TensorProto.FLOAT, [1, 1, 16, 16])], [("y", TensorProto.FLOAT, [1, 10])], inits, opset=14)


def run(proto_or_path, x):
    src = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


def ort_ops(path, tmp_path) -> list[str]:
    """Op types of the graph onnxruntime runs after its own optimizations."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout")
    onnx.save(stem_tail_model(), tmp / "m.onnx")
    np.savez(tmp / "calib.npz", x=np.abs(rand(32, 1, 16, 16)))
    compile_model(tmp / "m.onnx", "rzv2h", tmp / "pkg", calib=tmp / "calib.npz", pipeline=PIPELINE)
    return tmp


def test_stem_swap_is_exact_and_marks_the_stem_float():
    original = stem_tail_model()
    module = Module.from_proto(original)
    reasons, stem_ends = float_layers(module.graph)
    assert {"stem", "stem_relu", "stem_pool", "tail_pool", "gap"} <= set(reasons) and stem_ends == {"stem_relu"}
    assert "conv1" not in reasons and "fc" not in reasons
    swapped = module.to_proto()
    order = [n.name for n in swapped.graph.node]
    assert order.index("stem_pool") < order.index("stem_relu")
    x = rand(4, 1, 16, 16)
    np.testing.assert_allclose(run(swapped, x), run(original, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attrs", [{"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
                                   {"kernel_shape": [2, 2], "pads": [2, 2, 2, 2]}])
def test_stem_pool_with_possible_empty_windows_is_not_swapped(attrs):
    module = Module.from_proto(stem_tail_model(attrs))
    float_layers(module.graph)
    order = [n.name for n in module.to_proto().graph.node]
    assert order.index("stem_relu") < order.index("stem_pool")


def test_compiled_layout_runs_integer_kernels_in_onnxruntime(compiled, tmp_path):
    m = onnx.load(str(compiled / "pkg" / "model.onnx"))
    prod = {o: n for n in m.graph.node for o in n.output}
    stem = next(n for n in m.graph.node if n.name == "stem")
    assert stem.input[1] in {t.name for t in m.graph.initializer}  # float weight, no DequantizeLinear
    assert prod[next(n for n in m.graph.node if n.name == "tail_pool").input[0]].op_type == "HardSwish"
    assert {n.op_type for n in m.graph.node if n.name == "hswish1"} == {"Mul"}  # rewritten into Add + Mul
    ops = ort_ops(compiled / "pkg" / "model.onnx", tmp_path)
    assert "QLinearAdd" in ops and "QLinearMul" in ops and ops.count("QLinearConv") == 2
    assert ops.count("HardSigmoid") == 1  # only the float tail HardSwish is left to onnxruntime's float kernel


def test_compiled_layout_answers_like_float(compiled):
    x = np.abs(rand(16, 1, 16, 16))
    want, have = run(compiled / "m.onnx", x), run(compiled / "pkg" / "model.onnx", x)
    cos = np.sum(want * have, 1) / np.linalg.norm(want, axis=1) / np.linalg.norm(have, axis=1)
    assert cos.min() > 0.99


def test_int8_hardswish_matches_the_quantized_hardswish(tmp_path):
    """Rewritten HardSwish vs DQ → HardSwish → Q on the same calibrated model: within a few output steps."""
    onnx.save(stem_tail_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.abs(rand(32, 1, 16, 16)))
    compile_model(tmp_path / "m.onnx", "rzv2h", tmp_path / "a", calib=tmp_path / "calib.npz",
                  pipeline=PIPELINE.replace("int8-hardswish,", "").replace("insert-qdq", "insert-qdq{stem=int8}"))
    compile_model(tmp_path / "m.onnx", "rzv2h", tmp_path / "b", calib=tmp_path / "calib.npz",
                  pipeline=PIPELINE.replace("insert-qdq", "insert-qdq{stem=int8}"))
    a, b = onnx.load(str(tmp_path / "a" / "model.onnx")), onnx.load(str(tmp_path / "b" / "model.onnx"))
    assert "HardSwish" in {n.op_type for n in a.graph.node}
    assert {n.op_type for n in b.graph.node if n.name == "hswish1"} == {"Mul"}
    for m in (a, b):  # expose the quantized HardSwish output (conv2's input) to compare it directly
        m.graph.output.append(helper.make_tensor_value_info("h1", TensorProto.FLOAT, None))
    x = np.abs(rand(8, 1, 16, 16))
    sa = ort.InferenceSession(a.SerializeToString(), providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(b.SerializeToString(), providers=["CPUExecutionProvider"])
    q_h1 = next(n for n in b.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "h1")
    step = float(next(onnx.numpy_helper.to_array(t) for t in b.graph.initializer if t.name == q_h1.input[1]))
    for i in range(len(x)):
        ha = sa.run(["h1"], {"x": x[i:i + 1]})[0]
        hb = sb.run(["h1"], {"x": x[i:i + 1]})[0]
        assert np.abs(ha - hb).max() <= np.abs(ha).max() / 255 + step


def test_residual_read_of_the_float_stem_keeps_the_block_in_int8(tmp_path):
    """Shipped ResNet sample: the stem's output also feeds a residual Add; that Add and the conv before it
    must still run as QLinearAdd / QLinearConv (a float Add made onnxruntime run the conv in float)."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "models"
    compile_model(root / "mnist_resnet.onnx", "rzv2h", tmp_path / "pkg", calib=root / "mnist_calib.npz")
    ops = ort_ops(tmp_path / "pkg" / "model.onnx", tmp_path)
    float_convs = [op for op in ops if op in ("Conv", "FusedConv")]
    assert len(float_convs) == 1, " ".join(ops)  # the stem only
    assert "Add" not in ops and "QLinearAdd" in ops
