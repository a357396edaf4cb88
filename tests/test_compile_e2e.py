"""`drpc compile` end to end on the shipped sample model, through the real CLI entry point."""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from compiler.cli import main
from compiler.runtime import run_model
from compiler.instrument import relative_error

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"
LOSSLESS = "upgrade-opset{min=14},fold-constants,eliminate-identity,eliminate-dead-code,reduce-mean-to-pool,fuse-conv-bn,fuse-conv-add,merge-parallel-convs,fuse-conv-add,fuse-pad-conv,drop-padding-taps,fuse-matmul-add,fuse-hardswish"
PACKAGE = {"model.onnx", "reference.onnx", "deploy.json", "addr_map.txt", "report.json", "report.html",
           "deploy.schema.json", "sample_inputs.npz", "reference_outputs.npz"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The README's first command: prune 0.7, int8 for rzv2h, with IR dumps."""
    base = tmp_path_factory.mktemp("e2e")
    out, dump = base / "pkg", base / "dump"
    code = main(["compile", str(SAMPLE), "--target", "rzv2h", "--prune", "0.7", "--calib", str(CALIB),
                 "--out", str(out), "--dump-ir", str(dump)])
    assert code == 0
    return out, dump


def test_package_has_the_five_files_and_simulates(compiled, capsys):
    out, _ = compiled
    assert PACKAGE <= {p.name for p in out.iterdir()}
    assert main(["simulate", str(out)]) == 0
    assert "package OK" in capsys.readouterr().out


def test_dump_has_one_numbered_dump_per_changing_pass(compiled):
    out, dump = compiled
    report = json.loads((out / "report.json").read_text())
    changed = [(i + 1, p["name"]) for i, p in enumerate(report["passes"]) if p["changed"]]
    stems = sorted({p.stem for p in dump.iterdir()})
    assert stems == ["000_input"] + [f"{i:03d}_{name}" for i, name in changed]
    for stem in stems[1:]:
        assert (dump / f"{stem}.diff").is_file() and (dump / f"{stem}.onnx").is_file()


def test_deploy_json_says_what_happened(compiled):
    out, _ = compiled
    deploy = json.loads((out / "deploy.json").read_text())
    assert deploy["provenance"]["accuracy_measured"] is True
    assert "prune{ratio=0.7" in deploy["provenance"]["pipeline"]
    convs = [l for l in deploy["layers"] if l["op"] == "Conv"]
    assert convs and all(l["engine"] == "drpai" for l in convs)
    model = onnx.load(str(out / "model.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    lines = (out / "addr_map.txt").read_text().splitlines()
    assert lines and all(re.fullmatch(r"\S+ 0x[0-9a-f]+ 0x[0-9a-f]+", line) for line in lines)


def test_int8_weights_keep_every_zero_the_pruning_left(compiled):
    """Second-order weight rounding pushes each column's error onto the columns after it; a pruned (zero) weight
    must stay zero through it, or the target skips fewer weights than the report says."""
    out, dump = compiled
    pruned = onnx.load(str(next(dump.glob("*_prune.onnx"))))
    zeros = {t.name: onnx.numpy_helper.to_array(t) == 0 for t in pruned.graph.initializer if len(t.dims) >= 2}
    int8 = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    checked = [name for name in zeros if name + "_int8" in int8 and zeros[name].mean() > 0.3]
    assert len(checked) >= 5
    for name in checked:
        assert np.all(int8[name + "_int8"][zeros[name]] == 0), name
    deploy = {l["name"]: l for l in json.loads((out / "deploy.json").read_text())["layers"]}
    report = json.loads((out / "report.json").read_text())
    for layer in report["layers"]:
        if "sparsity" in layer:  # what the prune pass left
            assert deploy[layer["name"]]["weight_sparsity"] >= layer["sparsity"] - 1e-9, layer["name"]


def test_deploy_json_counts_params_and_macs_before_and_after_pruning(compiled):
    """Before: the float model after the lossless passes. After: the package's weights, with the zeros the
    target skips left out, counted here from the int8 tensors themselves."""
    out, _ = compiled
    deploy = json.loads((out / "deploy.json").read_text())
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    layers = {l["name"]: l for l in deploy["layers"]}
    pruned = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or dq.get(node.input[1]) not in inits:
            continue
        w, bias = inits[dq[node.input[1]]], inits[dq[node.input[2]]]
        layer = layers[node.name]
        assert layer["nonzero_params"] == np.count_nonzero(w) + bias.size, node.name
        assert layer["nonzero_macs"] == round(layer["macs"] * np.count_nonzero(w) / w.size), node.name
        assert layer["macs_before"] == layer["macs"] and layer["params_before"] == layer["params"]  # same shapes
        pruned += np.count_nonzero(w) < 0.5 * w.size
    assert pruned >= 5
    t = deploy["totals"]
    assert t["nonzero_params"] == sum(l["nonzero_params"] for l in layers.values())
    assert t["nonzero_macs"] < 0.5 * t["macs_before"] and t["params_before"] == t["params"]


def test_shape_data_is_not_counted_as_parameters(tmp_path):
    """A Reshape's int64 target and a Slice's bounds are shape data: deploy.json counts only the weights and
    biases (here the conv's and the Gemm's), before and after quantization alike."""
    from onnx import TensorProto, helper

    from graphs import init, model, rand
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Slice", ["c", "starts", "ends", "axes"], ["s"], name="crop"),
             helper.make_node("Reshape", ["s", "flat"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="head", transB=1)]
    inits = [init("w", rand(8, 3, 3, 3)), init("b", rand(8)), init("starts", np.array([1, 1], np.int64)),
             init("ends", np.array([5, 5], np.int64)), init("axes", np.array([2, 3], np.int64)),
             init("flat", np.array([1, -1], np.int64)), init("wg", rand(10, 128)), init("bg", rand(10))]
    onnx.save(model(nodes, [("x", TensorProto.FLOAT, [1, 3, 6, 6])], [("y", TensorProto.FLOAT, [1, 10])], inits),
              tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "--target", "rzv2h", "-o", str(tmp_path / "pkg")]) == 0
    deploy = json.loads((tmp_path / "pkg" / "deploy.json").read_text())
    layers = {l["name"]: l for l in deploy["layers"]}
    assert layers["crop"]["params"] == layers["flatten"]["params"] == 0
    weights = 8 * 3 * 3 * 3 + 8 + 10 * 128 + 10
    assert deploy["totals"]["params"] == deploy["totals"]["params_before"] == weights


def test_report_and_timing_show_where_the_pruning_time_went(compiled, tmp_path, capsys):
    out, _ = compiled
    prune = next(p for p in json.loads((out / "report.json").read_text())["passes"] if p["name"] == "prune")
    phases = prune["phase_seconds"]  # two steps (0.7), each phase summed over both
    assert set(phases) == {"Collecting layer statistics", "Measuring layer sensitivity", "Pruning layers",
                           "Refitting pruned layers in order"}
    assert all(v > 0 for v in phases.values()) and sum(phases.values()) <= prune["seconds"]
    pipeline = LOSSLESS + ",prune{ratio=0.3,allocation=estimated,refit=false}"
    assert main(["compile", str(SAMPLE), "--pipeline", pipeline, "--calib", str(CALIB), "--out", str(tmp_path / "p"),
                 "--timing"]) == 0
    rows = capsys.readouterr().out
    assert re.search(r"prune .*yes", rows) and re.search(r"Pruning layers .*\d\.\d{3}", rows)
    assert "Measuring layer sensitivity" not in rows and "Refitting" not in rows


def test_torch_export_of_the_sample_compiles_like_its_torchscript_export(compiled, tmp_path, capsys):
    """models/mnist_resnet_dynamo.onnx is the same trained network through torch.export (opset 20, ReduceMean for
    the average pool, nodes named 'node_Conv_124'): the README's command keeps every layer on DRP-AI, gives the
    same answers, and names each layer's PyTorch module."""
    source, out = ROOT / "models" / "mnist_resnet_dynamo.onnx", tmp_path / "dynamo"
    assert main(["compile", str(source), "--target", "rzv2h", "--prune", "0.7", "--calib", str(CALIB),
                 "--out", str(out)]) == 0
    assert "kept dense: 'node_Conv_124' (stem.0), 'node_linear_1' (fc2)" in capsys.readouterr().out
    facts = {p["name"]: p for p in json.loads((out / "report.json").read_text())["passes"]}
    assert facts["reduce-mean-to-pool"]["rewritten"] == 1
    deploys = [json.loads((pkg / "deploy.json").read_text()) for pkg in (compiled[0], out)]
    assert deploys[1]["totals"]["layers_on_cpu"] == deploys[0]["totals"]["layers_on_cpu"] == 0
    assert deploys[1]["totals"]["layers_on_drpai"] == deploys[0]["totals"]["layers_on_drpai"]
    parameters = {t.name for t in onnx.load(str(source)).graph.initializer}
    weighted = [l for l in deploys[1]["layers"] if l["op"] in ("Conv", "Gemm")]
    assert len(weighted) == 10 and all(l["pytorch_module"] + ".weight" in parameters for l in weighted)
    assert "node_Conv_126 (res1.a.0)" in (out / "report.html").read_text()
    with np.load(ROOT / "models" / "mnist_test.npz") as z:
        x, labels = z["input"], z["labels"]
    answers = [run_model(onnx.load(str(pkg / "model.onnx")), {"input": x})[0].argmax(1) for pkg in (compiled[0], out)]
    assert np.mean(answers[0] == answers[1]) >= 0.99
    assert abs(np.mean(answers[0] == labels) - np.mean(answers[1] == labels)) <= 0.005


def test_lossless_pipeline_matches_original(tmp_path):
    out = tmp_path / "lossless"
    assert main(["compile", str(SAMPLE), "--pipeline", LOSSLESS, "--calib", str(CALIB), "--out", str(out)]) == 0
    with np.load(ROOT / "models" / "mnist_test.npz") as z:
        x = z["input"][:64]
    want = run_model(onnx.load(str(SAMPLE)), {"input": x})[0]
    have = run_model(onnx.load(str(out / "model.onnx")), {"input": x})[0]
    assert relative_error(want, have) < 1e-4
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "BatchNormalization" not in ops


def test_print_pipeline_and_json(tmp_path, capsys):
    assert main(["compile", str(SAMPLE), "--print-pipeline", "--prune", "0.5", "--calib-method", "entropy"]) == 0
    text = capsys.readouterr().out.strip()
    assert "prune{ratio=0.5,mode=sparse}" in text and "calibrate{method=entropy}" in text
    assert text.index("prune") < text.index("insert-qdq")
    out = tmp_path / "pkg"
    assert main(["compile", str(SAMPLE), "--calib", str(CALIB), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"] == "rzv2h" and summary["accuracy_measured"] is True
    assert summary["totals"]["memory_bytes"] > 0


def test_passes_targets_inspect(capsys):
    assert main(["passes"]) == 0
    listed = capsys.readouterr().out
    for name in ("fold-constants", "fuse-conv-bn", "insert-qdq", "calibrate", "fuse-qdq", "prune"):
        assert name in listed
    assert main(["targets", "--json"]) == 0
    names = {t["name"] for t in json.loads(capsys.readouterr().out)}
    assert names == {"rzv2h", "rzv2n", "rzv2l", "rzv2m", "rzv2ma"}
    assert main(["inspect", str(SAMPLE), "--target", "rzv2h", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["macs"] > 0 and info["params"] > 0 and info["placement"]["drpai"] > 0


def test_inspect_places_layers_as_compile_will(tmp_path, capsys):
    """An exporter's Identity and Constant nodes are not layers: inspect places the model after the target's
    lossless passes, as compile does, so neither is counted on the CPU."""
    proto = onnx.load(str(SAMPLE))
    first = proto.graph.node[0]
    first_out = first.output[0]
    first.output[0] = "before_identity"
    proto.graph.node.insert(1, onnx.helper.make_node("Identity", ["before_identity"], [first_out], name="exported_identity"))
    path = tmp_path / "with_identity.onnx"
    onnx.save(proto, str(path))
    assert main(["inspect", str(path), "--target", "rzv2h", "--json"]) == 0
    placement = json.loads(capsys.readouterr().out)["placement"]
    assert placement["cpu"] == 0 and placement["cpu_nodes"] == {}
    assert main(["compile", str(path), "--calib", str(CALIB), "--out", str(tmp_path / "pkg"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["layers_on_cpu"] == 0


def test_readme_embedding_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Embedding the pass manager")[1].split("```python")[1].split("```")[0]
    monkeypatch.chdir(ROOT)
    code = code.replace('module.save("lossless.onnx")', f'module.save({str(tmp_path / "lossless.onnx")!r})')
    exec(compile(code, "README.md", "exec"), {})
    onnx.checker.check_model(onnx.load(str(tmp_path / "lossless.onnx")))


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("efficientnet_lite0", (2, 3, 224, 224)), ("ultraface_rfb_320", (1, 3, 240, 320))])
def test_lossless_pipeline_on_corpus(corpus, tmp_path, name, shape):
    src = corpus / "models" / f"{name}.onnx"
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    out = tmp_path / "pkg"
    assert main(["compile", str(src), "--pipeline", LOSSLESS, "--calib", str(tmp_path / "calib.npy"),
                 "--out", str(out)]) == 0
    original, compiled_model = onnx.load(str(src)), onnx.load(str(out / "model.onnx"))
    feed = {original.graph.input[0].name: x}
    for want, have in zip(run_model(original, feed), run_model(compiled_model, feed)):
        assert relative_error(want, have) < 1e-4
