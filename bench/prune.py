"""Post-training pruning: drpc's data-driven pruning beside plain magnitude pruning, same model, same data.

For each model, ratio R and mode (sparse / channel), the float model is pruned by the pipeline
`<lossless passes>,prune{ratio=R,mode=M,method=obs|magnitude}` in its own process (wall time and peak
memory are that process's), then evaluated here: accuracy on the evaluation split, arg-max agreement with
the unpruned model (on the evaluation split, and on the calibration split the pruning fitted: the gap
between the two is how much the choice and refit overfit the calibration data), remaining parameters
(non-zero weights), MACs (sparse: MACs of non-zero weights), model size and onnxruntime latency (median,
ratio to the unpruned model measured in the same run).

    python bench/prune.py
    python bench/prune.py --models mnist_resnet --ratios 0.5 --modes sparse
    python bench/prune.py --models efficientnet_lite0 --ratios 0.5 --modes sparse --options group_size=4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import datasets  # noqa: E402
from measure import run_measured  # noqa: E402
from ptq import evaluate, latency_ms  # noqa: E402

LOSSLESS = ("upgrade-opset{min=14},fold-constants,eliminate-identity,eliminate-dead-code,reduce-mean-to-pool,"
            "fuse-conv-bn,fuse-conv-add,merge-parallel-convs,fuse-conv-add,fuse-pad-conv,drop-padding-taps,fuse-matmul-add,fuse-hardswish")
MODELS = ("efficientnet_lite0", "ppocr_mobile_v2_cls", "mnist_cntk", "mnist_resnet", "mnist_vit")


def compile_one(task, calib_path: Path, out: Path, pipeline: str) -> dict:
    run = run_measured([sys.executable, "-m", "compiler.cli", "compile", str(task.model), "--calib", str(calib_path),
                        "--out", str(out), "--force", "--pipeline", pipeline, "--no-verify"], HERE.parent)
    if run.returncode != 0:
        return {"error": run.last_error("drpc:")}
    return {"seconds": run.seconds, "peak_mb": run.peak_mb}


def weights_and_macs(pkg: Path) -> tuple[int, int, int]:
    """(non-zero weights, dense MACs, MACs of non-zero weights) from the package's deploy.json."""
    totals = json.loads((pkg / "deploy.json").read_text())["totals"]
    return totals["nonzero_params"], totals["macs"], totals["nonzero_macs"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument("--modes", nargs="*", default=["sparse", "channel"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--options", default="", help="more prune options for every run, e.g. group_size=4 or pattern=2:4")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import onnxruntime as ort

    rows = []
    with tempfile.TemporaryDirectory(prefix="drpc-prune-") as tmp:
        for name in args.models:
            task = datasets.TASKS[name]()
            calib_path = Path(tmp) / f"{name}.npy"
            np.save(calib_path, task.calib)
            base_pkg = Path(tmp) / f"{name}_base"
            base = compile_one(task, calib_path, base_pkg, LOSSLESS)
            if "error" in base:
                print(f"{name}: {base['error']}")
                continue
            params0, macs0, _ = weights_and_macs(base_pkg)
            base_latency = latency_ms(base_pkg / "model.onnx", task, args.repeats)
            sess = ort.InferenceSession(str(base_pkg / "model.onnx"), providers=["CPUExecutionProvider"])
            fp32_out = datasets.run_task(sess, task)
            fp32_calib = datasets.run_task(sess, task, task.calib)
            rows.append({"model": name, "mode": "-", "ratio": 0.0, "method": "float", "acc": task.score(fp32_out, task.eval_y),
                         "agree": 1.0, "calib_agree": 1.0, "params": params0,
                         "macs": macs0, "effective_macs": macs0, "size_kb": (base_pkg / "model.onnx").stat().st_size / 1024,
                         "latency_ms": base_latency, "speedup": 1.0, **base})
            print(_fmt(rows[-1]), flush=True)
            for mode in args.modes:
                for ratio in args.ratios:
                    for method in ("obs", "magnitude"):
                        pkg = Path(tmp) / f"{name}_{mode}_{ratio}_{method}"
                        extra = f",{args.options}" if args.options else ""
                        pipeline = f"{LOSSLESS},prune{{ratio={ratio},mode={mode},method={method}{extra}}}"
                        row = {"model": name, "mode": mode, "ratio": ratio, "method": method,
                               **compile_one(task, calib_path, pkg, pipeline)}
                        if "error" not in row:
                            row.update(evaluate(pkg / "model.onnx", task, fp32_out, fp32_calib))
                            row["params"], row["macs"], row["effective_macs"] = weights_and_macs(pkg)
                            row["size_kb"] = (pkg / "model.onnx").stat().st_size / 1024
                            row["latency_ms"] = latency_ms(pkg / "model.onnx", task, args.repeats)
                            row["speedup"] = base_latency / row["latency_ms"]
                        rows.append(row)
                        print(_fmt(row), flush=True)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _fmt(r) -> str:
    head = f"{r['model']:20s} {r['mode']:7s} R={r['ratio']:.1f} {r['method']:9s}"
    if "error" in r:
        return f"{head} FAILED: {r['error']}"
    return (f"{head} acc {r['acc']*100:6.2f}% agree {r['agree']*100:6.2f}% (calibration {r['calib_agree']*100:6.2f}%) params {r['params']:>9,} MACs {r['macs']:>12,} "
            f"(non-zero {r['effective_macs']:>12,}) "
            f"size {r['size_kb']:7.0f} KB latency {r['latency_ms']:.3f} ms (x{r['speedup']:.2f}) "
            f"prune time {r['seconds']:.1f}s peak {r['peak_mb']:.0f} MB")


def table(rows) -> str:
    lines = ["| model | mode | R | method | top-1 | agreement with fp32 (calibration) | non-zero params | MACs (non-zero) | size | latency "
             "| pruning time | peak memory |",
             "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['ratio']} | {r['method']} | FAILED: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['mode']} | {r['ratio']} | {r['method']} | {r['acc']*100:.2f}% | {r['agree']*100:.2f}% ({r['calib_agree']*100:.2f}%) | {r['params']:,} | "
                     f"{r['macs']:,} ({r['effective_macs']:,}) | {r['size_kb']:.0f} KB | {r['latency_ms']:.3f} ms "
                     f"(x{r['speedup']:.2f}) | {r['seconds']:.1f} s | {r['peak_mb']:.0f} MB |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
