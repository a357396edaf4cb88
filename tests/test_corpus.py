"""Every public corpus model through `drpc compile` (slow: run with `pytest -m slow`; skipped without ../shared)."""

import json

import onnx
import pytest

from compiler.cli import main

MODELS = ["efficientnet_lite0", "magika_standard_v3_3", "mnist_cntk", "mtcnn_onet", "mtcnn_pnet", "mtcnn_rnet",
          "ppocr_mobile_v2_cls", "silero_vad_16k_op15", "ultraface_rfb_320"]


def compile_and_simulate(corpus, tmp_path, capsys, name, *extra):
    out = tmp_path / "pkg"
    code = main(["compile", str(corpus / "models" / f"{name}.onnx"), "--out", str(out), *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    if code != 0:
        assert code == 1 and len(err) == 1 and "Traceback" not in err[0], err
        assert not out.exists()
        return None
    assert main(["simulate", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out), out


@pytest.mark.slow
@pytest.mark.parametrize("prune", [None, "0.5"])
@pytest.mark.parametrize("name", MODELS)
def test_rzv2h_compiles_or_refuses_in_one_line(corpus, tmp_path, capsys, name, prune):
    assert compile_and_simulate(corpus, tmp_path, capsys, name, *(["--prune", prune] if prune else [])) is not None


@pytest.mark.slow
def test_silero_compiles_with_input_shapes(corpus, tmp_path, capsys):
    assert compile_and_simulate(corpus, tmp_path, capsys, "silero_vad_16k_op15", "--input-shape", "input=1,576",
                                "--input-shape", "state=2,1,128") is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_rzv2l_is_fp16_without_qdq_and_agrees(corpus, tmp_path, capsys, name):
    report, out = compile_and_simulate(corpus, tmp_path, capsys, name, "--target", "rzv2l")
    model = onnx.load(str(out / "model.onnx"))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert all(m["cosine"] >= 0.999 for m in report["outputs"].values()), report["outputs"]
