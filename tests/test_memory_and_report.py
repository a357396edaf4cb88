"""Memory planning (reuse, alignment, too-large models) and report.html as a browser renders it."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from backends.memory_plan import check_layout, plan_memory
from backends.partition import partition
from compiler.cli import main
from compiler.errors import MemoryPlanError
from compiler.target import load_target
from graphs import init, model, rand

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"


def relu_chain(n=10, size=(1, 16, 32, 32)):
    nodes, prev = [], "x"
    for i in range(n):
        nodes.append(helper.make_node("Relu" if i % 2 else "Sigmoid", [prev], [f"t{i}"], name=f"op{i}"))
        prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"], name="out"))
    m = model(nodes, [("x", TensorProto.FLOAT, list(size))], [("y", TensorProto.FLOAT, list(size))])
    return onnx.shape_inference.infer_shapes(m)


def test_chain_reuses_two_buffers_and_aligns():
    target = load_target("rzv2h")
    m = relu_chain()
    plan = plan_memory(m, target, partition(m, target))
    one = 16 * 32 * 32 * 4
    assert plan.activation_no_reuse == 10 * one
    assert plan.activation_peak == 2 * one
    assert all(t["offset"] % target.alignment == 0 for t in plan.tensors)
    assert check_layout(plan.tensors, plan.regions, target.memory_base, target.memory_size, target.alignment) == []
    lines = plan.addr_map_lines()
    assert lines[0].startswith("data_in 0x240000000 ")


def test_check_layout_catches_overlap_misalignment_and_outside():
    target = load_target("rzv2h")
    m = relu_chain()
    plan = plan_memory(m, target)
    data = [t for t in plan.tensors if t["region"] == "data"]
    a, b = data[0], next(t for t in data if t["lifetime"][0] <= data[0]["lifetime"][1] <= t["lifetime"][1] and t is not data[0])
    b2 = dict(b, offset=a["offset"])
    problems = check_layout([a, b2], plan.regions, target.memory_base, target.memory_size, target.alignment)
    assert any("overlap" in p for p in problems)
    problems = check_layout([dict(a, offset=a["offset"] + 8)], plan.regions, target.memory_base, target.memory_size, 64)
    assert any("not aligned" in p for p in problems)
    regions = [dict(r, base=r["base"] + target.memory_size) if r["name"] == "data" else r for r in plan.regions]
    assert any("outside the DRP-AI area" in p for p in check_layout([], regions, target.memory_base, target.memory_size, 64))


def wide_model(branches=70):
    """x[1,8,512,512] → `branches` 1x1 Convs all alive until one Concat: ~8 MiB each, > 512 MiB together."""
    nodes, outs, inits = [], [], []
    for i in range(branches):
        nodes.append(helper.make_node("Conv", ["x", f"w{i}"], [f"b{i}"], name=f"branch{i}"))
        inits.append(init(f"w{i}", rand(8, 8, 1, 1)))
        outs.append(f"b{i}")
    nodes.append(helper.make_node("Concat", outs, ["y"], name="concat", axis=1))
    return model(nodes, [("x", TensorProto.FLOAT, [1, 8, 512, 512])],
                 [("y", TensorProto.FLOAT, [1, 8 * branches, 512, 512])], inits)


def test_too_large_model_fails_naming_the_peak(tmp_path, capsys):
    path = tmp_path / "wide.onnx"
    onnx.save(wide_model(), path)
    out = tmp_path / "out"
    code = main(["compile", str(path), "--out", str(out), "--no-verify", "--pipeline", "fold-constants"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "MiB of DRP-AI memory" in err[0] and "activation peak" in err[0] and "rzv2h has 512.0 MiB" in err[0]
    assert not out.exists()
    with pytest.raises(MemoryPlanError):
        plan_memory(onnx.shape_inference.infer_shapes(wide_model()), load_target("rzv2h"))


@pytest.fixture(scope="module")
def sample_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "pkg"
    assert main(["compile", str(SAMPLE), "--calib", str(CALIB), "--prune", "0.5", "--out", str(out)]) == 0
    return out


def test_sample_package_reuses_activation_memory(sample_package):
    deploy = json.loads((sample_package / "deploy.json").read_text())
    t = deploy["totals"]
    assert t["activation_bytes"] < t["activation_bytes_no_reuse"] / 2
    tensors = deploy["tensors"]
    assert all(x["dtype"] in ("uint8", "int8", "int32", "float32") for x in tensors)
    weights = [x for x in tensors if x["region"] == "weight"]
    assert weights and any(x["dtype"] == "int8" for x in weights)
    layers = {l["name"]: l for l in deploy["layers"]}
    assert any(l["weight_sparsity"] > 0.3 for l in layers.values())
    assert all(l["weight_offset"] is not None for l in layers.values() if l["op"] == "Conv")


def test_report_html_gives_every_pruned_layer_before_and_after(sample_package):
    deploy = json.loads((sample_package / "deploy.json").read_text())
    page = (sample_package / "report.html").read_text()
    pruned = [l for l in deploy["layers"] if "sparsity" in l]
    assert len(pruned) >= 5 and "<h2>Pruning</h2>" in page
    for l in pruned:
        assert f"<td>{l['name']}</td><td>{l['op']}</td><td>{l['params_before']:,} → {l['nonzero_params']:,}</td>" in page
    t = deploy["totals"]
    assert f"{t['macs_before']:,} → {t['nonzero_macs']:,}" in page


def test_report_html_renders_in_headless_chromium(sample_package, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = sample_package / "report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    html = dom.stdout
    for section in ("Pipeline", "Pruning", "Placement", "Memory map", "Per layer"):
        assert f"<h2>{section}</h2>" in html
    assert html.count("<rect") > 20
    shot = tmp_path / "report.png"
    run = subprocess.run([chromium, *flags, "--window-size=1100,2000", f"--screenshot={shot}", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file() and shot.stat().st_size > 20000
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    engine_blue = np.all(np.abs(pixels.astype(int) - [0x2B, 0x8C, 0xBE]) < 12, axis=-1)
    assert engine_blue.sum() > 500  # the placement strip is drawn
