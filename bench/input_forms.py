"""The same model in the forms users have it: float32, an fp16 export, and int8 QDQ models from
onnxruntime's quantize_static and from NNCF. Does drpc's package from each answer like the one from the
float32 original?

Each corpus task's model is converted with onnxruntime's float16 converter (weights, activations and
interface in fp16) and quantized as bench/ptq.py does it, with quantize_static (QDQ, per-channel) and with
NNCF (preset MIXED), on the calibration split. All four files go through the same `drpc compile --target
rzv2h` (with `--prune` when given) on the same calibration split. Printed: accuracy on the evaluation split
(for tasks without labels, agreement with float32) of each form as given and of drpc's package from it, and
how often each package agrees with the one from float32.

    python bench/input_forms.py                          # every task of bench/datasets.py
    python bench/input_forms.py --prune 0.5 --tasks ppocr_mobile_v2_cls
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
from compiler.runtime import make_session  # noqa: E402
from quantizers import quantize_nncf, quantize_ort  # noqa: E402


def forms(task, folder: Path, calib: Path) -> dict[str, Path]:
    """{'float32': the model, 'fp16': its fp16 export, 'ort QDQ' and 'nncf QDQ': the int8 models onnxruntime and
    NNCF make of it as bench/ptq.py runs them}."""
    paths = {"float32": task.model, "fp16": folder / "fp16.onnx", "ort QDQ": folder / "ort.onnx",
             "nncf QDQ": folder / "nncf.onnx"}
    onnx.save(convert_float_to_float16(onnx.load(str(task.model))), str(paths["fp16"]))
    quantize_ort(task, calib, paths["ort QDQ"])
    quantize_nncf(task, calib, paths["nncf QDQ"])
    return paths


def answers(model: Path, task) -> np.ndarray:
    session = make_session(model)  # int8 with exact accumulation, as the accelerator computes (compiler.runtime)
    kind = session.get_inputs()[0].type
    dtype = {"tensor(float16)": np.float16, "tensor(float)": np.float32}.get(kind, task.eval_x.dtype)
    return datasets.run_task(session, task, task.eval_x.astype(dtype)).astype(np.float32).reshape(len(task.eval_x), -1)


def accuracy(task, logits: np.ndarray, fp32_logits: np.ndarray) -> str:
    if task.eval_y is not None:
        return f"{100 * task.score(logits, task.eval_y):.2f}%"
    return f"{100 * np.mean(logits.argmax(1) == fp32_logits.argmax(1)):.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(datasets.TASKS))
    parser.add_argument("--prune", type=float, default=0.0)
    args = parser.parse_args()
    from compiler.api import compile_model

    print("| model | form | as given | drpc package | package agrees with drpc's from float32 |")
    print("|---|---|---|---|---|")
    for name in args.tasks:
        task = datasets.TASKS[name]()
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            calib = tmp / "calib.npy"
            np.save(calib, task.calib)
            given, packaged = {}, {}
            for form, path in forms(task, tmp, calib).items():
                given[form] = answers(path, task)
                pkg = tmp / form.replace(" ", "_")
                compile_model(path, "rzv2h", pkg, calib=calib, prune=args.prune, force=True)
                packaged[form] = answers(pkg / "model.onnx", task)
        for form in given:
            agree = np.mean(packaged[form].argmax(1) == packaged["float32"].argmax(1))
            print(f"| {task.name} | {form} | {accuracy(task, given[form], given['float32'])} | "
                  f"{accuracy(task, packaged[form], given['float32'])} | {100 * agree:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
