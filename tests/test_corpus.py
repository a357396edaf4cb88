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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppocr_mobile_v2_cls", "magika_standard_v3_3"])
def test_models_onnxruntime_quantized_compile_like_their_float_originals(corpus, tmp_path, name):
    """The corpus model as onnxruntime's quantize_static leaves it (QDQ, per channel; it removes the Relu6 of
    ppocr's HardSwish and writes magika's Dense biases with a wrong axis): drpc's package from it answers
    like the one from the float model on the evaluation split."""
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import datasets
    from quantizers import quantize_ort

    from compiler.api import compile_model
    from compiler.runtime import make_session

    task = datasets.TASKS[name]()
    np.save(tmp_path / "calib.npy", task.calib)
    quantize_ort(task, tmp_path / "calib.npy", tmp_path / "qdq.onnx")
    answers = {}
    for form, source in (("float", task.model), ("qdq", tmp_path / "qdq.onnx")):
        compile_model(source, "rzv2h", tmp_path / form, calib=tmp_path / "calib.npy")
        logits = datasets.run_task(make_session(onnx.load(str(tmp_path / form / "model.onnx"))), task)
        answers[form] = logits.reshape(len(task.eval_x), -1).argmax(1)
    assert np.mean(answers["qdq"] == answers["float"]) >= 0.98


@pytest.mark.slow
def test_magika_channel_pruned_keeps_most_of_its_answers(corpus, tmp_path):
    """magika in channel mode (its jax2tf LayerNorms, sums over the conv's channels, are refit rather than
    blocking; its byte embedding, merged across positions into the conv's input, loses channels too):
    `--prune 0.5 --prune-mode channel` calibrated on every fourth file keeps top-1 on the other 451 within 3
    points of the float model (90.91% from the package against 90.24%; with only the conv's channels in
    play and the first 150 files calibrating, 80.53%)."""
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import datasets

    from compiler.runtime import make_session

    task = datasets.TASKS["magika_standard_v3_3"]()
    np.savez(tmp_path / "calib.npz", **{task.input_name: task.calib})
    out = tmp_path / "pkg"
    assert main(["compile", str(task.model), "--target", "rzv2h", "--prune", "0.5", "--prune-mode", "channel",
                 "--calib", str(tmp_path / "calib.npz"), "--out", str(out)]) == 0
    accuracy = {form: task.score(datasets.run_task(make_session(onnx.load(str(path))), task), task.eval_y)
                for form, path in (("float", task.model), ("pruned", out / "model.onnx"))}
    assert accuracy["pruned"] >= accuracy["float"] - 0.03, accuracy


def test_magika_dynamic_batch_reshapes_get_constant_targets(corpus, tmp_path, capsys):
    """magika as published (a dynamic batch; jax2tf computes its Reshape targets and Expand shapes from it at run
    time): every Reshape target in the package is a constant, and no shape arithmetic is left: the Expands, once
    their shapes are probed, broadcast nothing and go. It places like its batch-1 form (43 layers on the CPU
    before fold-constants probed the sizes, 34 while the Expands stayed, 22 now)."""
    report, out = compile_and_simulate(corpus, tmp_path, capsys, "magika_standard_v3_3")
    model = onnx.load(str(out / "model.onnx"))
    constants = {i.name for i in model.graph.initializer}
    assert all(n.input[1] in constants for n in model.graph.node if n.op_type == "Reshape")
    assert not [n.name for n in model.graph.node if n.op_type in ("Shape", "Expand")]
    deploy = json.loads((out / "deploy.json").read_text())
    assert deploy["totals"]["layers_on_cpu"] <= 22


def test_ultraface_dilated_convs_run_on_the_accelerator(corpus, tmp_path, capsys):
    """ultraface's RFB block has 3x3 Convs with dilations 3 and 5, which DRP-AI's convolution unit lacks: they ran
    on the CPU (11 layers there, 15 transfers). Written as space-to-batch, every Conv is on DRP-AI and only the
    box decoding stays on the CPU; the compile's lossless check held the rewrite to the original outputs."""
    report, out = compile_and_simulate(corpus, tmp_path, capsys, "ultraface_rfb_320")
    deploy = json.loads((out / "deploy.json").read_text())
    convs = [l for l in deploy["layers"] if l["op"] == "Conv"]
    assert all(l["engine"] == "drpai" for l in convs)
    assert [l["name"] for l in convs if l["name"] in ("Conv_51", "Conv_61")] == ["Conv_51", "Conv_61"]
    assert deploy["totals"]["layers_on_cpu"] <= 9 and len(deploy["transfers"]) <= 11
