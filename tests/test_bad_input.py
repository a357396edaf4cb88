"""Every bad input a user can give: exit 1 or 2, one line naming the problem, no traceback, no package,
the input file untouched."""

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compiler.cli import main
from graphs import conv_bn_model, init, model, rand

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def run_cli(capsys, args, out: Path, expect_code, *needles, watch: Path | None = None):
    """Run `drpc args`, check exit code, a single stderr line containing every needle, and no package."""
    before = digest(watch) if watch else None
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expect_code, err
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for needle in needles:
        assert needle in err[0], err[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    if watch:
        assert digest(watch) == before
    return err[0]


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.onnx"
    onnx.save(conv_bn_model(), path)
    return path


def compile_args(model_path, out, *extra):
    return ["compile", str(model_path), "--out", str(out), *map(str, extra)]


def test_missing_file(tmp_path, capsys):
    out = tmp_path / "out"
    run_cli(capsys, compile_args(tmp_path / "nope.onnx", out), out, 1, "nope.onnx", "no such file")


def test_directory_instead_of_file(tmp_path, capsys):
    out = tmp_path / "out"
    run_cli(capsys, compile_args(tmp_path, out), out, 1, "is a directory")


@pytest.mark.parametrize("content,label", [(b"", "empty"), (b"hello, this is text\n", "text"),
                                           (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "image")])
def test_not_onnx(tmp_path, capsys, content, label):
    bad = tmp_path / f"{label}.onnx"
    bad.write_bytes(content)
    out = tmp_path / "out"
    run_cli(capsys, compile_args(bad, out), out, 1, f"{label}.onnx", watch=bad)


def test_truncated_file(tmp_path, capsys, small):
    data = small.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    run_cli(capsys, compile_args(bad, out), out, 1, "truncated.onnx", watch=bad)


def test_checker_rejects(tmp_path, capsys):
    m = conv_bn_model()
    m.graph.node[0].input[0] = "missing_tensor"
    bad = tmp_path / "invalid.onnx"
    onnx.save(m, bad)
    out = tmp_path / "out"
    run_cli(capsys, compile_args(bad, out), out, 1, "invalid.onnx", "onnx checker", watch=bad)


def test_no_outputs(tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [])
    bad = tmp_path / "nooutputs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), bad)
    out = tmp_path / "out"
    run_cli(capsys, compile_args(bad, out), out, 1, "nooutputs.onnx", watch=bad)


def test_external_data_escaping_folder(tmp_path, capsys):
    sub = tmp_path / "models"
    sub.mkdir()
    path = sub / "ext.onnx"
    onnx.save(conv_bn_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes((sub / "w.bin").read_bytes())
    onnx.save(m, path)
    out = tmp_path / "out"
    run_cli(capsys, compile_args(path, out), out, 1, "outside the model's folder", watch=path)


def test_calibration_shape_mismatch(tmp_path, capsys, small):
    np.save(tmp_path / "c.npy", rand(4, 3, 8, 8))
    out = tmp_path / "out"
    run_cli(capsys, compile_args(small, out, "--calib", tmp_path / "c.npy"), out, 1, "c.npy", "'x'", "shape", watch=small)


def test_calibration_dtype_mismatch(tmp_path, capsys):
    nodes = [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")]
    path = tmp_path / "embed.onnx"
    onnx.save(model(nodes, [("ids", TensorProto.INT64, ["N", 4])], [("y", TensorProto.FLOAT, ["N", 4, 3])],
                    [init("table", rand(10, 3))]), path)
    np.save(tmp_path / "f.npy", rand(5, 4))
    out = tmp_path / "out"
    run_cli(capsys, compile_args(path, out, "--calib", tmp_path / "f.npy"), out, 1, "'ids'", "int64", "float32")


def test_calibration_input_names(tmp_path, capsys, small):
    np.savez(tmp_path / "c.npz", wrong=rand(4, 3, 16, 16))
    out = tmp_path / "out"
    run_cli(capsys, compile_args(small, out, "--calib", tmp_path / "c.npz"), out, 1, "no array for input 'x'", "wrong")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_calibration_nan_inf(tmp_path, capsys, small, bad):
    x = rand(6, 3, 16, 16)
    x[4, 1, 2, 3] = bad
    np.save(tmp_path / "c.npy", x)
    out = tmp_path / "out"
    run_cli(capsys, compile_args(small, out, "--calib", tmp_path / "c.npy"), out, 1, "NaN or Inf", "sample 4")


def test_pickled_npy_is_refused(tmp_path, capsys, small):
    np.save(tmp_path / "p.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out = tmp_path / "out"
    run_cli(capsys, compile_args(small, out, "--calib", tmp_path / "p.npy"), out, 1, "pickle")


def test_unknown_target(tmp_path, capsys, small):
    out = tmp_path / "out"
    run_cli(capsys, compile_args(small, out, "--target", "rzv9"), out, 2, "unknown target 'rzv9'")


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "1.0"])
def test_prune_ratio_outside_range(tmp_path, capsys, small, ratio):
    out = tmp_path / "out"
    run_cli(capsys, compile_args(small, out, "--prune", ratio), out, 2, f"--prune {float(ratio)}")


def test_existing_output_directory(tmp_path, capsys, small):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(compile_args(small, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "exists" in err[0] and "--force" in err[0]
    assert (out / "keep.txt").read_text() == "mine"
    assert main(compile_args(small, out, "--force")) == 0
    assert (out / "model.onnx").is_file() and not (out / "keep.txt").exists()


def test_output_directory_not_writable(tmp_path, capsys, small):
    if os.geteuid() == 0:  # root writes through permission bits: use a folder no one can create files in
        out = Path("/proc/drpc-test-out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "out"
    run_cli(capsys, compile_args(small, out), out, 2, "not writable")


def test_output_parent_is_a_file(tmp_path, capsys, small):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "dir"
    run_cli(capsys, compile_args(small, out), out, 2, "cannot create parent directory")


def test_missing_output_parents_are_created(tmp_path, small):
    out = tmp_path / "new" / "nested" / "pkg"
    assert main(compile_args(small, out)) == 0 and (out / "model.onnx").is_file()


def _subprocess(code: str, *args, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, **kw)


def test_disk_full(tmp_path):
    out = tmp_path / "out"
    proc = _subprocess("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        from compiler.cli import main
        sys.exit(main(["compile", sys.argv[1], "--calib", sys.argv[2], "--out", sys.argv[3]]))
    """, SAMPLE, CALIB, out)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "cannot write" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_ctrl_c_during_calibration(tmp_path):
    x = np.random.default_rng(0).standard_normal((4000, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "big.npy", x)
    out = tmp_path / "out"
    proc = _subprocess("""
        import os, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the parent ignores it
        import compiler.activations as acts
        original = acts.stream_activations
        def interrupted(*a, **k):
            for i, batch in enumerate(original(*a, **k)):
                if i == 3:
                    os.kill(os.getpid(), signal.SIGINT)
                yield batch
        acts.stream_activations = interrupted
        import passes.calibrate
        passes.calibrate.stream_activations = interrupted
        from compiler.cli import main
        sys.exit(main(["compile", sys.argv[1], "--calib", sys.argv[2], "--out", sys.argv[3]]))
    """, SAMPLE, tmp_path / "big.npy", out)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 130, proc.stderr
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_unsupported_construct_names_node(tmp_path, capsys):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("FancyOp", ["r"], ["y"], name="fancy", domain="com.example")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(m, path)
    out = tmp_path / "out"
    line = run_cli(capsys, compile_args(path, out), out, 1, watch=path)
    assert "FancyOp" in line or "fancy" in line or "com.example" in line


def test_no_traceback_from_installed_script(tmp_path):
    """The console script itself (not only main()) prints one line."""
    exe = Path(sys.executable).parent / "drpc"
    if not exe.exists():
        pytest.skip("drpc console script not installed")
    proc = subprocess.run([str(exe), "compile", str(tmp_path / "missing.onnx")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
