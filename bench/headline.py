"""The headline command on every model of a folder: `drpc compile MODEL --target rzv2h --prune 0.7`, then
`drpc simulate` on the package. Each compile runs in its own process (wall time and peak memory are its own).

Per model: exit code and, when it failed, drpc's one-line reason; whether the package simulates ("package
OK"); parameters and MACs before pruning → non-zero after; the share of the prunable weights removed;
layers left on the CPU; compile time and peak memory. Without --calib the headline prunes on synthetic
inputs, so this checks that drpc compiles the model, not how accurate the result is (bench/prune.py does that).

    python bench/headline.py                                   # the public corpus (../shared/corpus/models)
    python bench/headline.py /tmp/zoo/*.onnx                    # any models, e.g. bench/export_torchvision.py's
    python bench/headline.py --args "--prune-mode channel"     # extra compile options
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from datasets import CORPUS  # noqa: E402
from measure import run_measured  # noqa: E402


def headline(model: Path, out: Path, target: str, prune: float, extra: list[str], timeout: float) -> dict:
    drpc = [sys.executable, "-m", "compiler.cli"]
    run = run_measured([*drpc, "compile", str(model), "--target", target, "--prune", str(prune), "--out", str(out),
                        "--force", *extra], HERE.parent, timeout)
    row = {"model": model.stem, "exit": run.returncode, "seconds": run.seconds, "peak_mb": run.peak_mb}
    if run.returncode != 0:
        return {**row, "result": run.last_error("drpc:", width=400)}
    sim = run_measured([*drpc, "simulate", str(out)], HERE.parent, timeout)
    t = json.loads((out / "deploy.json").read_text())["totals"]
    prune = next((p for p in json.loads((out / "report.json").read_text())["passes"]
                  if p["name"] == "prune" and p["changed"]), None)
    return {**row, "result": "package OK" if "package OK" in sim.stdout else sim.last_error(),
            "params": f"{t.get('params_before', t['params']):,} → {t.get('nonzero_params', t['params']):,}",
            "macs": f"{t.get('macs_before', t['macs']):,} → {t.get('nonzero_macs', t['macs']):,}",
            "removed": f"{prune['achieved_ratio']:.1%}" if prune else "-",
            "cpu": f"{t['layers_on_cpu']} of {t['layers_on_drpai'] + t['layers_on_cpu']}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=lambda p: Path(p).resolve(), help="ONNX models (default: every corpus model)")
    ap.add_argument("--target", default="rzv2h")
    ap.add_argument("--prune", type=float, default=0.7)
    ap.add_argument("--args", default="", help="extra compile options, one string")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    args = ap.parse_args()
    models = args.models or sorted((CORPUS / "models").glob("*.onnx"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            row = headline(model, Path(tmp) / model.stem, args.target, args.prune, shlex.split(args.args),
                           args.timeout)
            rows.append(row)
            print(f"{row['model']}: exit {row['exit']} in {row['seconds']:.0f} s, {row['result']}", flush=True)
    print()
    print("`" + " ".join(["drpc compile MODEL --target", args.target, "--prune", str(args.prune), args.args]).strip() + "`")
    print("| model | exit | result | params → non-zero | MACs → non-zero | prunable removed | layers on CPU "
          "| compile time | peak memory |")
    print("|" + "---|" * 9)
    for r in rows:
        print(f"| {r['model']} | {r['exit']} | {r['result']} | {r.get('params', '')} | {r.get('macs', '')} "
              f"| {r.get('removed', '')} | {r.get('cpu', '')} | {r['seconds']:.0f} s | {r['peak_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
