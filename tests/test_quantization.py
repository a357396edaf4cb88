"""Int8 QDQ insertion, calibration and the accuracy-budget fallback, checked numerically in onnxruntime."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.api import compile_model
from compiler.observers import TensorObserver, choose_range, histogram_mse, quant_params
from passes.quant_common import gptq_round
from graphs import init, model, rand

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample_int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "pkg"
    compile_model(ROOT / "models" / "mnist_resnet.onnx", "rzv2h", out, calib=ROOT / "models" / "mnist_calib.npz")
    return onnx.load(str(out / "model.onnx")), out


def test_qdq_format(sample_int8):
    m, _ = sample_int8
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    inputs = {i.name for i in m.graph.input}
    stem = [n for n in m.graph.node if n.op_type == "Conv" and n.input[0] in inputs]
    assert len(stem) == 1 and stem[0].input[1] in inits  # 1-channel stem conv stays float (test_int8_layout.py)
    convs = [n for n in m.graph.node if n.op_type == "Conv" and n not in stem]
    assert convs
    for conv in convs:
        w_dq = prod[conv.input[1]]
        assert w_dq.op_type == "DequantizeLinear" and inits[w_dq.input[0]].dtype == np.int8
        axis = {a.name: a.i for a in w_dq.attribute}.get("axis", 1)
        assert axis == 0 and inits[w_dq.input[1]].shape == (inits[w_dq.input[0]].shape[0],)
        assert np.abs(inits[w_dq.input[0]]).max() <= 127
        x_dq = prod[conv.input[0]]
        assert x_dq.op_type == "DequantizeLinear" and inits[x_dq.input[2]].dtype == np.uint8
        b_dq = prod[conv.input[2]]
        assert b_dq.op_type == "DequantizeLinear" and inits[b_dq.input[0]].dtype == np.int32
        s_b = inits[b_dq.input[1]]
        np.testing.assert_allclose(s_b, inits[x_dq.input[1]] * inits[w_dq.input[1]], rtol=1e-6)


def test_int8_sample_model_keeps_accuracy(sample_int8):
    import onnxruntime as ort

    m, out = sample_int8
    with np.load(ROOT / "models" / "mnist_test.npz") as z:
        x, y = z["input"], z["labels"]
    acc = lambda path: float(np.mean(ort.InferenceSession(str(path)).run(None, {"input": x})[0].argmax(1) == y))
    assert acc(out / "model.onnx") >= acc(ROOT / "models" / "mnist_resnet.onnx") - 0.01


def test_observers_merge_batches_like_one_histogram():
    rng = np.random.default_rng(0)
    data = rng.standard_normal(40000).astype(np.float32)
    one, merged = TensorObserver(bins=256), TensorObserver(bins=256)
    one.observe_range(data)
    one.observe_hist(data)
    for chunk in np.split(data, 8):
        merged.observe_range(chunk)
    for chunk in np.split(data, 8):
        merged.observe_hist(chunk)
    assert (one.lo, one.hi) == (merged.lo, merged.hi)
    np.testing.assert_array_equal(one.hist, merged.hist)


def test_calibration_methods_clip_outliers():
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.standard_normal(1000000), [80.0]]).astype(np.float32)
    obs = TensorObserver()
    obs.observe_range(data)
    obs.observe_hist(data)
    assert choose_range(obs, "minmax")[1] == pytest.approx(80.0)
    for method in ("percentile", "entropy"):
        lo, hi = choose_range(obs, method)
        assert 2.0 < hi < 20.0, method
    full_error = histogram_mse(obs, *choose_range(obs, "minmax"))
    for method in ("mse", "auto"):
        lo, hi = choose_range(obs, method)
        assert hi < 60.0 and histogram_mse(obs, lo, hi) < full_error, method
    scale, zp = quant_params(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zp == 64


def test_fallback_float_meets_a_budget(tmp_path):
    """One hidden channel is 1000x larger than the rest and unused downstream: int8 with its range wipes out
    the useful channels, so the fallback must keep that tensor float and meet the budget."""

    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((16, 16)).astype(np.float32)
    w1[0] *= 1000.0
    w2 = rng.standard_normal((10, 16)).astype(np.float32)
    w2[:, 0] = 0.0
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="fc2", transB=1)]
    m = model(nodes, [("x", TensorProto.FLOAT, ["N", 16])], [("y", TensorProto.FLOAT, ["N", 10])],
              [init("w1", w1), init("b1", np.zeros(16, np.float32)), init("w2", w2), init("b2", np.zeros(10, np.float32))])
    onnx.save(m, tmp_path / "m.onnx")
    np.save(tmp_path / "c.npy", rng.standard_normal((64, 16)).astype(np.float32))
    compile_model(tmp_path / "m.onnx", "rzv2h", tmp_path / "a", calib=tmp_path / "c.npy",
                  pipeline="insert-qdq{rounding=nearest},calibrate{method=minmax},fallback-float{max_drop=5.0},fuse-qdq")
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    fb = next(p for p in report["passes"] if p["name"] == "fallback-float")
    assert fb["drop_before"] > 10.0
    assert fb["drop_after"] <= 5.0 and "fc1" in fb["kept_float"]


def test_gemm_bias_of_shape_1xn_becomes_int32_so_onnxruntime_runs_qgemm(tmp_path):
    """Old exporters (CNTK, opset 8) give Gemm a [1, N] bias: it must still become int32, or onnxruntime
    keeps a float Gemm that dequantizes its weight on every run."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2")]
    inits = [init("w", rand(16, 8)), init("b", rand(1, 8)), init("w2", rand(8, 4)), init("b2", rand(1, 4))]
    src = tmp_path / "gemm.onnx"
    onnx.save(model(nodes, [("x", TensorProto.FLOAT, [2, 16])], [("y", TensorProto.FLOAT, None)], inits), src)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32))
    compile_model(src, "rzv2h", tmp_path / "pkg", calib=tmp_path / "calib.npz")
    m = onnx.load(str(tmp_path / "pkg" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    for gemm in (n for n in m.graph.node if n.op_type == "Gemm"):
        b_dq = prod[gemm.input[2]]
        assert b_dq.op_type == "DequantizeLinear" and inits[b_dq.input[0]].dtype == np.int32
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "pkg" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node].count("QGemm") == 2


def test_bias_correction_removes_the_mean_shift_of_weight_rounding(tmp_path):
    """Depthwise weights that all round the same way, on inputs with a large mean: without correction every
    channel's output is off by (W - Wq) E[x]; with it the mean error per channel is far smaller."""
    c = 8
    w = np.full((c, 1, 3, 3), 0.3, np.float32)
    w[:, 0, 0, 0] = 1.27  # scale 0.01: 0.3 is exact; make every other weight round down by 0.004
    w[:, 0, 1:, :] = 0.306
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="dw", group=c, pads=[1, 1, 1, 1])]
    src = tmp_path / "dw.onnx"
    onnx.save(model(nodes, [("x", TensorProto.FLOAT, ["N", c, 8, 8])], [("y", TensorProto.FLOAT, None)],
                    [init("w", w), init("b", np.zeros(c, np.float32))]), src)
    x = (np.random.default_rng(0).random((64, c, 8, 8)) * 2 + 5).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    from compiler.runtime import run_model

    want = run_model(onnx.load(str(src)), {"x": x[:16]})[0]
    shift = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        compile_model(src, "rzv2h", out, calib=tmp_path / "calib.npz",
                      pipeline=f"insert-qdq{{rounding=nearest,bias_correction={flag}}},calibrate{{method=minmax}},fuse-qdq")
        have = run_model(onnx.load(str(out / "model.onnx")), {"x": x[:16]})[0]
        shift[flag] = float(np.abs((have - want)[:, :, 1:-1, 1:-1].mean(axis=(0, 2, 3))).max())
    assert shift["false"] > 0.1, shift
    assert shift["true"] < 0.25 * shift["false"], shift


def test_gptq_rounding_keeps_pruned_zeros_and_still_moves_the_output_less_than_nearest():
    """On correlated post-ReLU inputs, a weight matrix with 60% zeros: every zero stays zero, and the layer output
    moves less than with rounding to nearest (which keeps zeros by itself; measured 0.81x)."""
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((4000, 64)) @ rng.standard_normal((64, 64)), 0)
    w = rng.standard_normal((32, 64))
    w[rng.random(w.shape) < 0.6] = 0
    scale = np.abs(w).max(axis=1) / 127
    gptq = gptq_round(w, x.T @ x, scale).astype(np.float64)
    nearest = np.clip(np.round(w / scale[:, None]), -127, 127)
    assert np.all(gptq[w == 0] == 0)
    moved = lambda q: np.linalg.norm(x @ (q * scale[:, None] - w).T)
    assert moved(gptq) < 0.9 * moved(nearest), (moved(gptq), moved(nearest))


def test_conv_read_by_a_float_op_still_fuses_into_qlinearconv(tmp_path):
    """SE block: the conv's output feeds an int8 GlobalAveragePool and a float gate Mul; the Mul must read the
    dequantized tensor too, or onnxruntime keeps the conv in float."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Conv", ["g", "wr", "br"], ["s"], name="se"), helper.make_node("HardSigmoid", ["s"], ["gate"]),
             helper.make_node("Mul", ["r", "gate"], ["m"]), helper.make_node("Conv", ["m", "w2", "b2"], ["y"], name="conv2")]
    inits = [init("w1", rand(8, 6, 3, 3)), init("b1", rand(8)), init("wr", rand(8, 8, 1, 1)), init("br", rand(8)),
             init("w2", rand(4, 8, 1, 1)), init("b2", rand(4))]
    src = tmp_path / "se.onnx"
    onnx.save(model(nodes, [("x", TensorProto.FLOAT, ["N", 6, 8, 8])], [("y", TensorProto.FLOAT, None)], inits), src)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 6, 8, 8)).astype(np.float32))
    compile_model(src, "rzv2h", tmp_path / "pkg", calib=tmp_path / "calib.npz")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "pkg" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    # conv1 and se run as QLinearConv; conv2 writes the float graph output, so it has no Q to fuse with
    assert ops.count("QLinearConv") == 2 and "FusedConv" not in ops, " ".join(ops)
    assert "QLinearMul" in ops and "Mul" not in ops, " ".join(ops)  # int8-hardswish quantized the [0, 1] gate


def test_a_dead_channel_beside_a_real_bias_still_gets_an_int32_bias(tmp_path):
    """A channel whose weights are all near 0 (a BatchNorm with gamma near 0 folded in, as in PaddlePaddle's
    PicoDet layout model) gets a weight scale near 0, so its bias overflows int32 at input x weight scale. The
    channel's weight scale is raised until the bias fits: every bias is int32, onnxruntime fuses the conv, and
    the outputs stay those of the float model."""
    w1 = rand(8, 6, 3, 3)
    w1[3] *= 1e-25
    b1 = rand(8)
    b1[3] = 0.5
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2")]
    src = tmp_path / "dead.onnx"
    onnx.save(model(nodes, [("x", TensorProto.FLOAT, ["N", 6, 8, 8])], [("y", TensorProto.FLOAT, None)],
                    [init("w1", w1), init("b1", b1), init("w2", rand(4, 8, 1, 1)), init("b2", rand(4))]), src)
    x = np.random.default_rng(0).standard_normal((32, 6, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    compile_model(src, "rzv2h", tmp_path / "pkg", calib=tmp_path / "calib.npz")
    report = json.loads((tmp_path / "pkg" / "report.json").read_text())
    calibrate = next(p for p in report["passes"] if p["name"] == "calibrate")
    assert calibrate["bias_overflow"] == [] and calibrate["weight_scale_raised_for_bias"] == ["conv1"]
    m = onnx.load(str(tmp_path / "pkg" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    for conv in (n for n in m.graph.node if n.op_type == "Conv"):
        assert prod[conv.input[2]].op_type == "DequantizeLinear"
        assert inits[prod[conv.input[2]].input[0]].dtype == np.int32
    import onnxruntime as ort

    from compiler.runtime import run_model

    want = run_model(onnx.load(str(src)), {"x": x[:8]})[0]
    have = run_model(m, {"x": x[:8]})[0]
    assert np.abs(have - want).max() < 0.05 * np.abs(want).max()
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "pkg" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node].count("QLinearConv") == 1
