"""Int8 post-training quantization, side by side: drpc and the peers a user could pick instead.

Peers: onnxruntime quantize_static, OpenVINO NNCF, AMD Quark, NVIDIA ModelOpt and Qualcomm AIMET (their recipes:
bench/quantizers.py). Same model, same calibration split, same evaluation split (bench/datasets.py). Each
tool quantizes in its own process so its wall time and peak memory are its own; accuracy, agreement with
fp32, model size and onnxruntime latency (median over repeats, ratio to fp32 measured in the same run) are
measured here afterwards, in this environment's onnxruntime. Accuracy is taken twice: with exact int8
arithmetic (Q/DQ run unfused, as the accelerator computes; the headline column) and in onnxruntime's fused
int8 kernels for this CPU, which on x86 without VNNI saturate u8 x s8 pair sums at int16.

onnxruntime and NNCF come with `pip install -e '.[bench]'`. Quark, ModelOpt and AIMET pin other onnx,
onnxruntime and torch builds, so each goes in its own virtual environment, named with --python:

    python -m venv /venvs/quark && /venvs/quark/bin/pip install amd-quark==0.13 torch==2.13.0
    python -m venv /venvs/modelopt && /venvs/modelopt/bin/pip install 'nvidia-modelopt[onnx]==0.47.0'
    python -m venv /venvs/aimet && /venvs/aimet/bin/pip install aimet-onnx==2.42.0

    python bench/ptq.py                       # every model; onnxruntime, NNCF (both forms), drpc
    python bench/ptq.py --models mnist_cntk --tools ort drpc --repeats 5
    python bench/ptq.py --python quark=/venvs/quark/bin/python modelopt=/venvs/modelopt/bin/python \\
        aimet=/venvs/aimet/bin/python        # and the three peers in their environments
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import datasets  # noqa: E402
from measure import run_measured  # noqa: E402
from quantizers import QUANTIZERS  # noqa: E402

# the default; the other peers when --python names their environment. nncf_pt: NNCF with one scale per activation
# tensor, the scheme drpc and DRP-AI use (plain NNCF gives depthwise-conv inputs one scale per channel)
TOOLS = ("ort", "nncf", "nncf_pt", "drpc")


def run_tool(tool, task, calib_path, out, method, python=sys.executable) -> dict:
    """Run one quantizer (bench/quantizers.py) in a fresh process of `python` (its own wall time and peak memory)."""
    cmd = [python, str(HERE / "quantizers.py"), tool, str(task.model), task.input_name, str(calib_path), str(out)]
    run = run_measured(cmd + ([method] if tool == "drpc" else []), out.parent)  # peers leave temp files in cwd
    if run.returncode != 0 or not out.exists():
        return {"error": run.last_error(width=160)}
    return {"seconds": json.loads(run.stdout.strip().splitlines()[-1])["seconds"], "peak_mb": run.peak_mb}


def latency_ms(model_path, task, repeats: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    fixed = sess.get_inputs()[0].shape[0]
    x = task.eval_x[: fixed if isinstance(fixed, int) else 1]
    sess.run(None, {task.input_name: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, {task.input_name: x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def scoring_session(model_path, task, host_kernels: bool = False):
    """(session, fused): a session to score a model with. drpc's (int8 computed exactly, Q/DQ unfused as the
    accelerator computes it; see compiler.runtime) and False; or onnxruntime's own, whose fused int8 kernels
    depend on this CPU (on x86 without VNNI they saturate u8 x s8 pair sums at int16), and True: with
    `host_kernels`, or for a QDQ model onnxruntime runs only fused (per-axis scales that do not match their
    tensor fail on the first sample unfused)."""
    import onnxruntime as ort

    from compiler.runtime import make_session

    if not host_kernels:
        session = make_session(model_path)
        try:
            session.run(None, {task.input_name: as_input(session, task.eval_x[:1])})
            return session, False
        except Exception:
            pass
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]), True


def as_input(session, x: np.ndarray) -> np.ndarray:
    """`x` in the float type the session's first input takes (an fp16 model takes float16)."""
    kind = session.get_inputs()[0].type
    return x.astype({"tensor(float16)": np.float16, "tensor(float)": np.float32}.get(kind, x.dtype))


def evaluate(model_path, task, fp32_out, fp32_calib=None, host_kernels: bool = False) -> dict:
    """Accuracy and arg-max agreement with fp32 on the evaluation split, scored as `scoring_session` says
    (`fused_only`: the model runs only in onnxruntime's fused kernels); with `fp32_calib`, also the agreement
    on the calibration inputs (`calib_agree`)."""
    sess, fused = scoring_session(model_path, task, host_kernels)
    out = datasets.run_task(sess, task)
    scores = {"acc": task.score(out, task.eval_y), "agree": task.agreement(out, fp32_out),
              "fused_only": fused and not host_kernels}
    if fp32_calib is not None:
        calib = datasets.run_task(sess, task, task.calib)
        scores["calib_agree"] = task.agreement(calib, fp32_calib)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(datasets.TASKS))
    ap.add_argument("--tools", nargs="*", choices=list(QUANTIZERS),
                    help=f"default: {' '.join(TOOLS)} and every tool --python names")
    ap.add_argument("--python", nargs="*", default=[], metavar="TOOL=PATH",
                    help="run TOOL's quantizer with this interpreter (its own virtual environment)")
    ap.add_argument("--method", default="default", help="drpc calibration method (default: the target's)")
    ap.add_argument("--repeats", type=int, default=30, help="latency repeats (median reported)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    pythons = dict(item.split("=", 1) for item in args.python)
    tools = args.tools or [*TOOLS, *(t for t in pythons if t not in TOOLS)]
    import onnxruntime as ort

    rows = []
    with tempfile.TemporaryDirectory(prefix="drpc-ptq-") as tmp:
        for name in args.models:
            task = datasets.TASKS[name]()
            calib_path = Path(tmp) / f"{name}_calib.npy"
            np.save(calib_path, task.calib)
            fp32 = datasets.run_task(ort.InferenceSession(str(task.model), providers=["CPUExecutionProvider"]), task)
            base = {"model": name, "tool": "fp32", "acc": task.score(fp32, task.eval_y), "agree": 1.0,
                    "size_kb": task.model.stat().st_size / 1024, "latency_ms": latency_ms(task.model, task, args.repeats)}
            rows.append(base)
            for tool in tools:
                out = Path(tmp) / f"{name}_{tool}.onnx"
                row = {"model": name, "tool": tool, **run_tool(tool, task, calib_path, out, args.method,
                                                                  pythons.get(tool, sys.executable))}
                if "error" not in row:
                    try:
                        row["acc_host"] = evaluate(out, task, fp32, host_kernels=True)["acc"]
                        row.update(evaluate(out, task, fp32))
                    except Exception as exc:  # a tool that writes a model onnxruntime refuses
                        row = {"model": name, "tool": tool, "error": "invalid model: " + str(exc).splitlines()[0][-120:]}
                        print(_fmt(row), flush=True)
                        rows.append(row)
                        continue
                    row["size_kb"] = out.stat().st_size / 1024
                    row["latency_ms"] = latency_ms(out, task, args.repeats)
                    row["speedup_vs_fp32"] = base["latency_ms"] / row["latency_ms"]
                rows.append(row)
                print(_fmt(row), flush=True)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _fmt(row) -> str:
    if "error" in row:
        return f"{row['model']:22s} {row['tool']:8s} FAILED: {row['error']}"
    if row.get("fused_only"):
        return (f"{row['model']:22s} {row['tool']:8s} acc {row['acc']*100:6.2f}% agree {row['agree']*100:6.2f}% "
                "(runs only in onnxruntime's fused int8 kernels)")
    return (f"{row['model']:22s} {row['tool']:8s} acc {row['acc']*100:6.2f}% agree {row['agree']*100:6.2f}% "
            f"(host int8 kernels: acc {row.get('acc_host', row['acc'])*100:6.2f}%) "
            f"time {row.get('seconds', 0):6.1f}s peak {row.get('peak_mb', 0):7.0f} MB size {row['size_kb']:8.0f} KB "
            f"latency {row['latency_ms']:7.3f} ms (x{row.get('speedup_vs_fp32', 1):.2f} vs fp32)")


def table(rows) -> str:
    head = ("| model | tool | top-1 | agreement with fp32 | top-1 in onnxruntime's int8 kernels on this CPU | compile time "
            "| peak memory | model size | latency (1 thread) | speed vs fp32 |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | FAILED: {r['error']} | | | | | | | |")
            continue
        exact = " (runs fused only)" if r.get("fused_only") else ""
        lines.append(f"| {r['model']} | {r['tool']} | {r['acc']*100:.2f}%{exact} | {r['agree']*100:.2f}% | "
                     f"{r.get('acc_host', r['acc'])*100:.2f}% | "
                     f"{r.get('seconds', 0):.1f} s | {r.get('peak_mb', 0):.0f} MB | {r['size_kb']:.0f} KB | "
                     f"{r['latency_ms']:.3f} ms | {r.get('speedup_vs_fp32', 1):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
