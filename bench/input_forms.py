"""The same model in the forms users have it: float32, an fp16 export, and int8 QDQ models from
onnxruntime's quantize_static, NNCF and, given their virtualenvs, AMD Quark, NVIDIA ModelOpt and Qualcomm
AIMET. Does drpc's package from each answer like the one from the float32 original?

Each corpus task's model is converted with onnxruntime's float16 converter (weights, activations and
interface in fp16) and quantized as bench/ptq.py does it (bench/quantizers.py) on the calibration split. All
files go through the same `drpc compile --target rzv2h` (with `--prune` when given) on the same calibration
split. Printed: accuracy on the evaluation split (for tasks without labels, agreement with float32) of each
form as given and of drpc's package from it, int8 computed exactly, and how often each package agrees with
the one from float32.

    python bench/input_forms.py                          # every task of bench/datasets.py
    python bench/input_forms.py --prune 0.5 --tasks ppocr_mobile_v2_cls
    python bench/input_forms.py --python quark=/venvs/quark/bin/python modelopt=... aimet=...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import datasets  # noqa: E402
from ptq import as_input, run_tool, scoring_session  # noqa: E402
from quantizers import quantize_nncf, quantize_ort  # noqa: E402


def forms(task, folder: Path, calib: Path, pythons: dict[str, str]) -> dict[str, Path | str]:
    """{'float32': the model, 'fp16': its fp16 export, 'ort QDQ' and 'nncf QDQ': the int8 models onnxruntime and
    NNCF make of it as bench/ptq.py runs them, and '<tool> QDQ' for each peer `pythons` names (Quark, ModelOpt,
    AIMET from their virtualenvs)}; a peer that fails gives its one-line reason instead of a path."""
    paths: dict[str, Path | str] = {"float32": task.model, "fp16": folder / "fp16.onnx", "ort QDQ": folder / "ort.onnx",
                                    "nncf QDQ": folder / "nncf.onnx"}
    onnx.save(convert_float_to_float16(onnx.load(str(task.model))), str(paths["fp16"]))
    quantize_ort(task, calib, paths["ort QDQ"])
    quantize_nncf(task, calib, paths["nncf QDQ"])
    for tool, python in pythons.items():
        out = folder / f"{tool}.onnx"
        run = run_tool(tool, task, calib, out, "default", python)
        paths[f"{tool} QDQ"] = run.get("error", out)
    return paths


def answers(model: Path, task) -> tuple[np.ndarray, bool]:
    """The model's outputs on the evaluation split, scored as bench/ptq.py scores (int8 exact), and whether they
    come from onnxruntime's fused kernels (a QDQ model it runs only fused)."""
    session, fused = scoring_session(model, task)
    out = datasets.run_task(session, task, as_input(session, task.eval_x)).astype(np.float32)
    return out.reshape(len(task.eval_x), -1), fused


def accuracy(task, logits: np.ndarray, fp32_logits: np.ndarray) -> str:
    if task.eval_y is not None:
        return f"{100 * task.score(logits, task.eval_y):.2f}%"
    return f"{100 * np.mean(logits.argmax(1) == fp32_logits.argmax(1)):.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(datasets.TASKS))
    parser.add_argument("--prune", type=float, default=0.0)
    parser.add_argument("--python", nargs="*", default=[], metavar="TOOL=PATH",
                        help="also the QDQ model this peer makes (quark, modelopt, aimet), run with this interpreter")
    args = parser.parse_args()
    pythons = dict(item.split("=", 1) for item in args.python)
    from compiler.api import compile_model
    from compiler.errors import DrpcError

    print("| model | form | as given | drpc package | package agrees with drpc's from float32 |")
    print("|---|---|---|---|---|")
    for name in args.tasks:
        task = datasets.TASKS[name]()
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            calib = tmp / "calib.npy"
            np.save(calib, task.calib)
            given, packaged, failed = {}, {}, {}
            for form, path in forms(task, tmp, calib, pythons).items():
                if isinstance(path, str):
                    failed[form] = f"the tool failed: {path}"
                    continue
                given[form] = answers(path, task)
                pkg = tmp / form.replace(" ", "_")
                try:
                    compile_model(path, "rzv2h", pkg, calib=calib, prune=args.prune, force=True)
                except DrpcError as exc:  # drpc's one-line refusal is the result for this form
                    failed[form] = f"drpc refused it: {exc}"
                    continue
                packaged[form] = answers(pkg / "model.onnx", task)[0]
        reference = given["float32"][0]
        for form, (logits, fused) in ((f, g) for f, g in given.items() if f in packaged):
            agree = np.mean(packaged[form].argmax(1) == packaged["float32"].argmax(1))
            note = " (runs fused only)" if fused else ""
            print(f"| {task.name} | {form} | {accuracy(task, logits, reference)}{note} | "
                  f"{accuracy(task, packaged[form], reference)} | {100 * agree:.2f}% |", flush=True)
        for form, reason in failed.items():
            print(f"| {task.name} | {form} | {reason} | | |", flush=True)


if __name__ == "__main__":
    main()
