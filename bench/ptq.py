"""Int8 post-training quantization, side by side: onnxruntime quantize_static, NNCF and drpc.

Same model, same calibration split, same evaluation split (bench/datasets.py). Each tool quantizes in its
own process so its wall time and peak memory (ru_maxrss) are its own; accuracy, agreement with fp32,
model size and onnxruntime latency (median over repeats, ratio to fp32 measured in the same run) are
measured here afterwards.

    python bench/ptq.py                       # every model, every tool
    python bench/ptq.py --models mnist_cntk --tools ort drpc --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import datasets  # noqa: E402
from measure import run_measured  # noqa: E402

TOOLS = ("ort", "nncf", "drpc")


# ------------------------------------------------------------------ quantizers (run in a child process)
def at_least_opset13(model: onnx.ModelProto) -> onnx.ModelProto:
    """The peers quantize opset >= 13 only (per-channel DequantizeLinear; NNCF refuses < 10): an older model is
    upgraded with onnx's version converter first, as a user of either tool would."""
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return onnx.version_converter.convert_version(model, 13) if opset < 13 else model


def quantize_ort(task, calib_path: Path, out: Path) -> None:
    """onnxruntime: quant_pre_process, then quantize_static (QDQ, per-channel, MinMax, U8 act / S8 weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    x = np.load(calib_path)
    source, original = task.model, onnx.load(str(task.model))
    upgraded = at_least_opset13(original)
    if upgraded is not original:
        source = out.with_suffix(".opset13.onnx")
        onnx.save(upgraded, str(source))
    pre = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(source), str(pre))
    except Exception:  # its symbolic shape inference fails on some models: the documented fallback
        try:
            quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        except Exception:  # quantize the model as it is
            pre = source

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(len(x)))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {task.input_name: x[i:i + 1]}

    def quantize(**extra):
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, extra_options=extra)

    try:
        quantize()
    except ValueError:  # its int32-bias scale adjustment fails on a bias that is not 1-D (mnist_cntk): turn it off
        quantize(QDQDisableWeightAdjustForInt32Bias=True)


def quantize_nncf(task, calib_path: Path, out: Path) -> None:
    """NNCF on the ONNX model: preset MIXED, fast bias correction (its default)."""
    import nncf

    x = np.load(calib_path)
    model = at_least_opset13(onnx.load(str(task.model)))
    dataset = nncf.Dataset([x[i:i + 1] for i in range(len(x))], lambda item: {task.input_name: item})
    q = nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(x))
    onnx.save(q, str(out))


def quantize_drpc(task, calib_path: Path, out: Path, method: str = "default") -> None:
    """drpc's default rzv2h pipeline (no pruning) through the Python API."""
    from compiler.api import compile_model

    pkg = out.with_suffix("")
    compile_model(task.model, "rzv2h", pkg, calib=calib_path, calib_method=None if method == "default" else method,
                  force=True)
    os.replace(pkg / "model.onnx", out)


def worker(tool: str, task_name: str, calib_path: str, out: str, method: str) -> None:
    task = datasets.TASKS[task_name](limit=1)  # only the model and input name are needed here
    fn = {"ort": quantize_ort, "nncf": quantize_nncf, "drpc": quantize_drpc}[tool]
    start = time.perf_counter()
    if tool == "drpc":
        fn(task, Path(calib_path), Path(out), method)
    else:
        fn(task, Path(calib_path), Path(out))
    print(json.dumps({"seconds": time.perf_counter() - start}))


# ------------------------------------------------------------------ the parent: run, measure, tabulate
def run_tool(tool, task, calib_path, out, method) -> dict:
    """Run one quantizer in a fresh process (its own wall time and peak memory)."""
    run = run_measured([sys.executable, __file__, "--worker", tool, task.name, str(calib_path), str(out), method],
                       out.parent)  # peers leave temp files in cwd
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


def evaluate(model_path, task, fp32_out, fp32_calib=None) -> dict:
    """Accuracy and arg-max agreement with fp32 on the evaluation split; with `fp32_calib`, also the agreement on
    the calibration inputs (`calib_agree`)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    out = datasets.run_task(sess, task)
    scores = {"acc": task.score(out, task.eval_y), "agree": float(np.mean(out.argmax(-1) == fp32_out.argmax(-1)))}
    if fp32_calib is not None:
        calib = datasets.run_task(sess, task, task.calib)
        scores["calib_agree"] = float(np.mean(calib.argmax(-1) == fp32_calib.argmax(-1)))
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(datasets.TASKS))
    ap.add_argument("--tools", nargs="*", default=list(TOOLS))
    ap.add_argument("--method", default="default", help="drpc calibration method (default: the target's)")
    ap.add_argument("--repeats", type=int, default=30, help="latency repeats (median reported)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
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
            for tool in args.tools:
                out = Path(tmp) / f"{name}_{tool}.onnx"
                row = {"model": name, "tool": tool, **run_tool(tool, task, calib_path, out, args.method)}
                if "error" not in row:
                    try:
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
        return f"{row['model']:22s} {row['tool']:5s} FAILED: {row['error']}"
    return (f"{row['model']:22s} {row['tool']:5s} acc {row['acc']*100:6.2f}% agree {row['agree']*100:6.2f}% "
            f"time {row.get('seconds', 0):6.1f}s peak {row.get('peak_mb', 0):7.0f} MB size {row['size_kb']:8.0f} KB "
            f"latency {row['latency_ms']:7.3f} ms (x{row.get('speedup_vs_fp32', 1):.2f} vs fp32)")


def table(rows) -> str:
    head = "| model | tool | top-1 | agreement with fp32 | compile time | peak memory | model size | latency (1 thread) | speed vs fp32 |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | FAILED: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['tool']} | {r['acc']*100:.2f}% | {r['agree']*100:.2f}% | "
                     f"{r.get('seconds', 0):.1f} s | {r.get('peak_mb', 0):.0f} MB | {r['size_kb']:.0f} KB | "
                     f"{r['latency_ms']:.3f} ms | {r.get('speedup_vs_fp32', 1):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
