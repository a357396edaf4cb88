"""The simulator accepts a sound package and refuses each kind of corruption with its own message."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from backends.simulator import simulate
from compiler.api import compile_model
from compiler.cli import main
from graphs import init, model, rand

ROOT = Path(__file__).resolve().parents[1]


def attention_model():
    """Conv (6 input channels: not a float stem) → Reshape → MatMul(a, aᵀ) (activation × activation: a CPU op on DRP-AI targets) → Softmax."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["a"], name="reshape"),
             helper.make_node("Transpose", ["a"], ["at"], name="transpose", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["a", "at"], ["s"], name="attn_matmul"),
             helper.make_node("Softmax", ["s"], ["y"], name="softmax", axis=-1)]
    inits = [init("w", rand(8, 6, 3, 3, scale=0.3)), init("b", rand(8)), init("shape", np.array([1, 8, 64], np.int64))]
    return model(nodes, [("x", TensorProto.FLOAT, [1, 6, 8, 8])], [("y", TensorProto.FLOAT, [1, 8, 8])], inits)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    import onnx

    base = tmp_path_factory.mktemp("sim")
    onnx.save(attention_model(), base / "attn.onnx")
    np.save(base / "calib.npy", rand(32, 6, 8, 8))
    out = base / "pkg"
    compile_model(base / "attn.onnx", "rzv2h", out, calib=base / "calib.npy")
    return out


def corrupted(package, tmp_path, edit):
    """A copy of the package with deploy.json changed by `edit(descriptor)`."""
    dst = tmp_path / "bad"
    shutil.copytree(package, dst)
    d = json.loads((dst / "deploy.json").read_text())
    edit(d)
    (dst / "deploy.json").write_text(json.dumps(d))
    return dst


def two_live_tensors(d):
    data = [t for t in d["tensors"] if t["region"] == "data" and t["size"] > 0]
    for a in data:
        for b in data:
            if a is not b and a["lifetime"][0] <= b["lifetime"][1] and b["lifetime"][0] <= a["lifetime"][1]:
                return a, b
    raise AssertionError("no two simultaneously live tensors")


def test_sound_package_passes(package):
    report = simulate(package)
    assert report.ok, report.problems()
    assert report.samples > 0
    (name, metrics), = report.outputs.items()
    assert metrics["cosine"] > 0.99 and metrics["correct_ratio"] > 0.5


def test_cpu_op_is_placed_on_cpu(package):
    d = json.loads((package / "deploy.json").read_text())
    layer = next(l for l in d["layers"] if l["name"] == "attn_matmul")
    assert layer["engine"] == "cpu" and layer["cpu_reason"]


def _set_overlap(d):
    a, b = two_live_tensors(d)
    b["offset"] = a["offset"]


def _misalign(d):
    t = next(t for t in d["tensors"] if t["region"] == "data" and t["size"] > 0)
    t["offset"] += 1


def _region_outside(d):
    region = [r for r in d["memory"]["regions"] if r["size"] > 0][-1]
    region["base"] = d["target"]["memory"]["base"] + d["target"]["memory"]["size"]


def _wrong_shape(d):
    t = next(t for t in d["tensors"] if t["region"] == "data" and len(t["shape"]) > 1)
    t["shape"][1] += 1


def _wrong_scale(d):
    t = next(t for t in d["tensors"] if isinstance(t["scale"], float))
    t["scale"] *= 2


def _illegal_engine(d):
    next(l for l in d["layers"] if l["name"] == "attn_matmul")["engine"] = "drpai"


def _schema(d):
    del d["totals"]


@pytest.mark.parametrize("edit,check,message", [
    (_set_overlap, "memory", "overlap"),
    (_misalign, "memory", "align"),
    (_region_outside, "memory", "outside"),
    (_wrong_shape, "tensors", "shape"),
    (_wrong_scale, "quantization", "scale"),
    (_illegal_engine, "placement", "cannot run it"),
    (_schema, "schema", "totals"),
])
def test_each_corruption_is_refused_with_its_own_message(package, tmp_path, edit, check, message):
    report = simulate(corrupted(package, tmp_path, edit))
    assert not report.ok
    assert report.checks[check], report.problems()
    assert any(message in p for p in report.checks[check]), report.checks[check]


def test_missing_file_is_refused(package, tmp_path, capsys):
    dst = tmp_path / "missing"
    shutil.copytree(package, dst)
    (dst / "addr_map.txt").unlink()
    assert main(["simulate", str(dst)]) == 1
    err = capsys.readouterr().err
    assert "addr_map.txt is missing" in err and "Traceback" not in err


def test_tampered_reference_is_refused(package, tmp_path):
    dst = tmp_path / "tampered"
    shutil.copytree(package, dst)
    with np.load(dst / "reference_outputs.npz") as z:
        outs = {k: z[k] + 1.0 for k in z.files}
    np.savez(dst / "reference_outputs.npz", **outs)
    report = simulate(dst)
    assert any("reference_outputs.npz" in p for p in report.checks["run"])


def test_simulate_with_external_data(package, tmp_path):
    np.save(tmp_path / "data.npy", rand(5, 6, 8, 8))
    report = simulate(package, tmp_path / "data.npy")
    assert report.ok and report.samples == 5


def test_quantized_conv_runs_with_exact_int8_accumulation_on_any_host():
    """A 1x1 Conv over 64 channels of uint8 255 x int8 127: each product is 32,385, so onnxruntime's x86 int8 kernel
    without VNNI, which adds products in pairs into a saturating int16, gets 32,767 per pair and half the sum.
    The accelerator accumulates exactly; drpc's sessions (the simulator's, fallback-float's) must too, or a
    package's measured answers, and the choices made from them, depend on the host CPU. Exact: round(64 x 32,385 /
    16,384) = 127 output steps; saturated: 64."""
    from onnx import numpy_helper

    from compiler.runtime import make_session

    channels, out_scale = 64, 16384.0
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("sx", np.array(1.0, np.float32)), ("zx", np.array(0, np.uint8)),
        ("w", np.full((8, channels, 1, 1), 127, np.int8)), ("sw", np.array(1.0, np.float32)),
        ("sy", np.array(out_scale, np.float32)), ("zy", np.array(0, np.uint8))]]
    proto = model(nodes, [("x", TensorProto.FLOAT, [1, channels, 4, 4])], [("y", TensorProto.FLOAT, [1, 8, 4, 4])],
                  inits)
    got = make_session(proto).run(None, {"x": np.full((1, channels, 4, 4), 255, np.float32)})[0]
    exact = np.round(channels * 255 * 127 / out_scale) * out_scale
    assert np.all(got == exact), (got.ravel()[:4], exact)
