"""Models a tool already quantized: onnxruntime's quantize_static output of the shipped sample, and what AMD
Quark, NVIDIA ModelOpt and Qualcomm AIMET made of it (tests/data). QDQ models are turned back into their float
model (strip-quantization) and compile like the float original; operator form is refused with a line naming
the node."""

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator
from onnxruntime.quantization import QuantFormat, quantize_static

from backends.partition import partition
from compiler.cli import main
from compiler.instrument import relative_error
from compiler.ir import Module
from compiler.runtime import run_model
from compiler.target import load_target
from passes.strip_quantization import StripQuantization
from test_bad_input import run_cli

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"


class CalibReader:
    """The first `count` shipped calibration samples, one at a time, for onnxruntime's quantizer."""

    def __init__(self, count: int):
        with np.load(CALIB) as z:
            x = next(iter(z.values()))[:count]
        self.rows = iter({"input": x[i:i + 1]} for i in range(len(x)))

    def get_next(self):
        return next(self.rows, None)


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qdq") / "qdq.onnx"
    quantize_static(str(SAMPLE), str(path), CalibReader(64), quant_format=QuantFormat.QDQ)
    return path


@pytest.fixture(scope="module")
def test_data():
    with np.load(ROOT / "models" / "mnist_test.npz") as z:
        return z["input"][:500], z["labels"][:500]


def ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def test_strip_quantization_gives_back_the_float_model(qdq_model, test_data):
    """No Q/DQ is left; each weight is exactly what its DequantizeLinear computed; the Relus onnxruntime's
    quantizer folded into unsigned ranges come back as Clips to those ranges, one per range that starts at 0
    after a tensor that can be negative (the sample's 9, none more); the float model answers like the
    original float model up to the int8 rounding of its weights, and like the QDQ model up to the rounding
    of its activations."""
    x, labels = test_data
    quantized = onnx.load(str(qdq_model))
    assert ops(quantized)["Relu"] == 0 and ops(quantized)["DequantizeLinear"] > 20
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    dequantized = {n.output[0]: ReferenceEvaluator(n).run(None, {name: inits[name] for name in n.input if name})[0]
                   for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}

    module = Module.load(qdq_model)
    assert StripQuantization().run(module, None) is True
    stripped = module.to_proto(infer_shapes=True)
    onnx.checker.check_model(stripped, full_check=True)
    counts = ops(stripped)
    assert counts["QuantizeLinear"] == counts["DequantizeLinear"] == 0
    assert counts["Relu"] == 0 and counts["Clip"] == ops(onnx.load(str(SAMPLE)))["Relu"] == 9
    clip_min = {t.name: onnx.numpy_helper.to_array(t) for t in stripped.graph.initializer if t.name.endswith("_min")}
    assert clip_min and all(v == 0 for v in clip_min.values())
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in stripped.graph.initializer}
    assert dequantized and all(np.array_equal(weights[name], value) for name, value in dequantized.items())

    float_out = run_model(onnx.load(str(SAMPLE)), {"input": x})[0]
    stripped_out = run_model(stripped, {"input": x})[0]
    qdq_out = run_model(quantized, {"input": x})[0]
    assert relative_error(float_out, stripped_out) < relative_error(float_out, qdq_out)
    assert np.mean(stripped_out.argmax(1) == float_out.argmax(1)) >= 0.99
    assert StripQuantization().run(module, None) is False  # a float model is untouched


def test_readme_command_compiles_a_qdq_model_like_its_float_original(qdq_model, test_data, tmp_path, capsys):
    """`drpc compile` with --prune 0.7 on the QDQ model: it warns that it quantizes anew, counts the float
    model's MACs and parameters, the package simulates OK against the float model, and it answers like the
    package compiled from the float original."""
    x, labels = test_data
    packages = {name: tmp_path / name for name in ("float", "qdq")}
    for name, source in (("float", SAMPLE), ("qdq", qdq_model)):
        assert main(["compile", str(source), "--target", "rzv2h", "--prune", "0.7", "--calib", str(CALIB),
                     "--out", str(packages[name])]) == 0
    captured = capsys.readouterr()
    assert "the model was already quantized" in " ".join(captured.err.split())
    assert "MACs 5,791,744 →" in captured.out.split("package:")[1]  # the second compile's summary
    assert main(["simulate", str(packages["qdq"])]) == 0
    assert "package OK" in capsys.readouterr().out
    reference = onnx.load(str(packages["qdq"] / "reference.onnx"))
    assert ops(reference)["DequantizeLinear"] == 0
    answers = {name: run_model(onnx.load(str(pkg / "model.onnx")), {"input": x})[0].argmax(1)
               for name, pkg in packages.items()}
    assert np.mean(answers["qdq"] == answers["float"]) >= 0.97
    assert np.mean(answers["qdq"] == labels) >= np.mean(answers["float"] == labels) - 0.01


def test_inspect_names_the_form_and_places_a_qdq_model_like_its_float_original(qdq_model, capsys):
    """`drpc inspect` says how compile will treat a quantized model and places its layers as compile will. Placed
    as given, its Q/DQ nodes go with the layers they serve, the DequantizeLinear giving the output with its
    producer: nothing on the CPU."""
    infos = {}
    for name, path in (("float", SAMPLE), ("qdq", qdq_model)):
        assert main(["inspect", str(path), "--target", "rzv2h", "--json"]) == 0
        infos[name] = json.loads(capsys.readouterr().out)
    assert infos["float"]["form"] == "float32" and infos["qdq"]["form"] == "quantized (QDQ)"
    assert infos["qdq"]["macs"] == infos["float"]["macs"]
    assert infos["qdq"]["placement"]["cpu"] == 0 and infos["qdq"]["placement"]["subgraphs"] == 1
    assert main(["inspect", str(qdq_model)]) == 0
    assert "form: quantized (QDQ): compile takes it back to the float model" in capsys.readouterr().out
    as_given = partition(Module.load(qdq_model).to_proto(infer_shapes=True), load_target("rzv2h"))
    assert set(as_given.engine_of.values()) == {"drpai"} and len(as_given.subgraphs) == 1


def test_model_quantized_in_operator_form_names_the_node(tmp_path, capsys):
    """The sample in operator form (QLinearConv): drpc takes float or QDQ models and says so in one line."""
    quantized = tmp_path / "quantized.onnx"
    quantize_static(str(SAMPLE), str(quantized), CalibReader(8), quant_format=QuantFormat.QOperator)
    run_cli(capsys, ["compile", str(quantized), "--calib", str(CALIB), "--out", str(tmp_path / "pkg")],
            tmp_path / "pkg", 1, "strip-quantization", "(QLinearConv): the model is quantized in operator form",
            watch=quantized)
    assert main(["inspect", str(quantized), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["form"] == "quantized (operator form)"


def test_float_weights_quantized_in_the_graph_become_their_rounded_values():
    """NNCF's form: float weights through QuantizeLinear → DequantizeLinear (int8, per channel). Each becomes
    the constant the pair computes (the rounded weight, as onnx's reference evaluator gives it)."""
    proto = onnx.load(str(SAMPLE))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    expected, raw = {}, {}
    for node in [n for n in proto.graph.node if n.op_type == "Conv"]:
        w = inits[node.input[1]]
        scale = (np.abs(w).reshape(len(w), -1).max(1) / 127).astype(np.float32)
        names = [f"{node.name}_{k}" for k in ("scale", "zp", "q", "dq")]
        params = [onnx.numpy_helper.from_array(scale, names[0]),
                  onnx.numpy_helper.from_array(np.zeros(len(w), np.int8), names[1])]
        pair = [onnx.helper.make_node("QuantizeLinear", [node.input[1], names[0], names[1]], [names[2]], axis=0),
                onnx.helper.make_node("DequantizeLinear", [names[2], names[0], names[1]], [names[3]], axis=0)]
        alone = onnx.helper.make_model(onnx.helper.make_graph(
            pair, "pair", [], [onnx.helper.make_tensor_value_info(names[3], onnx.TensorProto.FLOAT, None)],
            [onnx.numpy_helper.from_array(w, node.input[1]), *params]),
            opset_imports=[onnx.helper.make_opsetid("", 21)])  # onnx's evaluator has DequantizeLinear from 19
        expected[names[3]], raw[names[3]] = ReferenceEvaluator(alone).run(None, {})[0], w
        proto.graph.initializer.extend(params)
        proto.graph.node.extend(pair)  # after their reader: the loader sorts them
        node.input[1] = names[3]
    module = Module.from_proto(proto, check=True)
    assert StripQuantization().run(module, None) is True
    stripped = module.to_proto()
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in stripped.graph.initializer}
    assert ops(stripped)["QuantizeLinear"] == ops(stripped)["DequantizeLinear"] == 0 and ops(stripped)["Clip"] == 0
    assert len(expected) == 8 and all(np.array_equal(weights[k], v) for k, v in expected.items())
    assert all(not np.array_equal(expected[k], raw[k]) for k in expected)  # the weights were rounded


def test_a_quantized_tensor_read_through_several_dequantizers_gets_one_clip():
    """One QuantizeLinear (range starting at 0) read by two DequantizeLinear nodes, one per consumer: both
    consumers read one Clip of the float tensor, and the model equals the float one where nothing saturates."""
    from onnx import TensorProto, helper

    from graphs import init, model, rand

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("QuantizeLinear", ["c", "s", "zp"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d1"], name="dq1"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d2"], name="dq2"),
             helper.make_node("Sigmoid", ["d1"], ["a"], name="sig"),
             helper.make_node("Tanh", ["d2"], ["b"], name="tanh"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    w, x = rand(4, 3, 1, 1), rand(1, 3, 8, 8)
    built = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                  [init("w", w), init("s", np.float32(1.0)), init("zp", np.uint8(0))])
    module = Module.from_proto(built)
    assert StripQuantization().run(module, None) is True
    stripped = module.to_proto()
    assert ops(stripped) == {"Conv": 1, "Clip": 1, "Sigmoid": 1, "Tanh": 1, "Add": 1}
    conv = np.einsum("oi,bihw->bohw", w[:, :, 0, 0], x)
    assert conv.min() < 0 < conv.max() < 255  # the Clip acts at 0 only: it is the Relu a quantizer removed
    relu = helper.make_graph([nodes[0], helper.make_node("Relu", ["c"], ["r"]),
                              helper.make_node("Sigmoid", ["r"], ["a"]), helper.make_node("Tanh", ["r"], ["b"]),
                              nodes[-1]], "relu", built.graph.input, built.graph.output, built.graph.initializer)
    assert relative_error(run_model(helper.make_model(relu, opset_imports=built.opset_import), {"x": x})[0],
                          run_model(stripped, {"x": x})[0]) < 1e-6


def test_a_bias_scale_read_along_the_wrong_axis_is_read_along_the_axis_it_fits():
    """onnxruntime's quantizer gives a [1, C] bias C scales but axis 0 (magika's Dense layers): onnxruntime
    cannot evaluate that node alone. strip-quantization reads the scales along the one axis of length C,
    which gives the bias the quantized model computes with: x[:, c] · scale[c]."""
    from onnx import TensorProto, helper

    from graphs import init, rand

    bias, scale = np.arange(-3, 3, dtype=np.int32).reshape(1, 6), np.linspace(0.5, 1.0, 6).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"], name="bias_dq", axis=0),
             helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    built = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        [init("bq", bias), init("bs", scale), init("bz", np.zeros(6, np.int32)), init("w", rand(4, 6))]),
        opset_imports=[helper.make_opsetid("", 13)])
    module = Module.from_proto(built)
    assert StripQuantization().run(module, None) is True
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in module.to_proto().graph.initializer}
    assert np.array_equal(weights["b"], bias * scale)


def test_a_relu6_the_quantizer_removed_comes_back_with_its_top():
    """HardSwish written out, x · Clip(x + 3, 0, 6) / 6, after onnxruntime's quantizer removed the Clip: the
    pair's range [0, 5.99] (the largest value calibration saw) is all that is left of it. strip-quantization
    gives back Clip(0, 6), the top snapped to the whole number within one step; with only a Relu, the output
    for x = 10 would be 21.7, not 10."""
    from onnx import TensorProto, helper

    from graphs import init, model

    nodes = [helper.make_node("Add", ["x", "three"], ["a"], name="add"),
             helper.make_node("QuantizeLinear", ["a", "s", "zp"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"], name="dequant"),
             helper.make_node("Div", ["d", "six"], ["g"], name="div"),
             helper.make_node("Mul", ["x", "g"], ["y"], name="mul")]
    built = model(nodes, [("x", TensorProto.FLOAT, [1, 64])], [("y", TensorProto.FLOAT, [1, 64])],
                  [init("three", np.float32(3)), init("six", np.float32(6)), init("s", np.float32(5.99 / 255)),
                   init("zp", np.uint8(0))])
    module = Module.from_proto(built)
    assert StripQuantization().run(module, None) is True
    stripped = module.to_proto()
    bounds = {t.name: float(onnx.numpy_helper.to_array(t)) for t in stripped.graph.initializer if "_range_" in t.name}
    assert sorted(bounds.values()) == [0.0, 6.0]
    x = np.linspace(-10, 10, 64, dtype=np.float32).reshape(1, 64)
    hardswish = x * np.clip(x + 3, 0, 6) / 6
    assert relative_error(hardswish, run_model(stripped, {"x": x})[0]) < 1e-6


# The shipped sample as three more quantizers leave it: `python bench/quantizers.py TOOL models/mnist_resnet.onnx input
# CALIB.npy OUT.onnx` in each tool's virtualenv, CALIB.npy the first 200 digits of models/mnist_calib.npz.
PEER_FORMS = {
    "quark": {"Clip": 9},      # AMD Quark 0.13: int8 weights and int32 biases behind DequantizeLinear, Relus folded
    "modelopt": {"Relu": 9},   # NVIDIA ModelOpt 0.47: opset 19, float weights through Q/DQ, BatchNorms not folded
    "aimet": {"Relu": 9},      # Qualcomm AIMET 2.42: float weights through Q/DQ on every tensor
}


@pytest.fixture(scope="module")
def float_package(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("float") / "pkg"
    assert main(["compile", str(SAMPLE), "--target", "rzv2h", "--calib", str(CALIB), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("tool", sorted(PEER_FORMS))
def test_models_other_quantizers_made_compile_like_the_float_original(tool, float_package, test_data, tmp_path,
                                                                       capsys):
    """What Quark, ModelOpt and AIMET write for the sample: the reference is the float model again (no Q/DQ; a
    Relu the quantizer folded into an unsigned range comes back as a Clip), the package simulates OK, and it
    answers like the package compiled from the float original (97.70% top-1 on the 1,000 test digits from
    all four when measured)."""
    x, labels = test_data
    pkg = tmp_path / "pkg"
    assert main(["compile", str(ROOT / "tests" / "data" / f"mnist_resnet_{tool}.onnx"), "--target", "rzv2h",
                 "--calib", str(CALIB), "--out", str(pkg)]) == 0
    assert main(["simulate", str(pkg)]) == 0
    assert "package OK" in capsys.readouterr().out
    reference = ops(onnx.load(str(pkg / "reference.onnx")))
    assert reference["DequantizeLinear"] == reference["QuantizeLinear"] == 0
    assert reference["Conv"] == 8 and all(reference[op] == n for op, n in PEER_FORMS[tool].items())
    answers = {name: run_model(onnx.load(str(p / "model.onnx")), {"input": x})[0].argmax(1)
               for name, p in (("peer", pkg), ("float", float_package))}
    assert np.mean(answers["peer"] == answers["float"]) >= 0.99
    assert np.mean(answers["peer"] == labels) >= np.mean(answers["float"] == labels) - 0.005
