"""The public corpus as benchmark tasks: model, calibration split, evaluation split, and how to score it.

Preprocessing follows ../shared/corpus/README.md. Splits: every fifth ImageNet image for calibration; the
first 200 OCR samples; every fourth magika file (151; the file is sorted by type, so the first 150 would be 7
of its 29 types and the rest 23 others); 200 MNIST digits spread over the classes (the file is sorted by
class, so "the first 200" would be all zeros); evaluation is always the rest.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


@dataclass
class Task:
    """A model with calibration inputs, evaluation inputs and labels (labels None: compare with fp32)."""

    name: str
    model: Path
    input_name: str
    calib: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray | None
    score: Callable[[np.ndarray, np.ndarray], float]  # (logits, labels) -> accuracy in [0, 1]
    batch: int = 32


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max equals the label."""
    return float(np.mean(np.asarray(logits).reshape(len(labels), -1).argmax(1) == labels))


def imagenet(limit: int | None = None) -> Task:
    """efficientnet_lite0 on the 1000-image ImageNet sample (center 224 crop, RGB, (x-127)/128)."""
    from PIL import Image

    folder = CORPUS / "data" / "imagenet_sample"
    rows = list(csv.DictReader(open(folder / "labels.csv")))[:limit]
    xs, ys = [], []
    for row in rows:
        with Image.open(folder / "images" / row["file"]) as im:
            im = im.convert("RGB")
            w, h = im.size
            left, top = (w - 224) // 2, (h - 224) // 2
            arr = np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.float32)
        xs.append(((arr - 127.0) / 128.0).transpose(2, 0, 1))
        ys.append(int(row["class_index"]))
    x, y = np.stack(xs), np.array(ys)
    idx = np.arange(len(x))
    cal = idx % 5 == 0
    return Task("efficientnet_lite0", CORPUS / "models" / "efficientnet_lite0.onnx", "input", x[cal], x[~cal], y[~cal],
                top1, batch=16)


def ocr(limit: int | None = None) -> Task:
    """ppocr_mobile_v2_cls on text lines at 0° (class 0) and 180° (class 1); first 200 samples calibrate."""
    from PIL import Image

    folder = CORPUS / "data" / "ocr" / "text_lines"
    names = sorted(p.name for p in folder.glob("*.png"))[:limit]
    xs, ys = [], []
    for name in names:
        with Image.open(folder / name) as im:
            im = im.convert("RGB")
            for label, img in ((0, im), (1, im.rotate(180))):
                w = min(192, max(1, round(img.width * 48 / img.height)))
                arr = np.asarray(img.resize((w, 48), Image.BILINEAR), dtype=np.float32) / 255.0
                arr = (arr - 0.5) / 0.5
                padded = np.zeros((48, 192, 3), np.float32)
                padded[:, :w] = arr
                xs.append(padded.transpose(2, 0, 1))
                ys.append(label)
    x, y = np.stack(xs), np.array(ys)
    return Task("ppocr_mobile_v2_cls", CORPUS / "models" / "ppocr_mobile_v2_cls.onnx", "x", x[:200], x[200:], y[200:], top1)


def magika(limit: int | None = None) -> Task:
    """magika on byte features of 602 real files; labels by file extension; every fourth file calibrates."""
    with np.load(CORPUS / "data" / "magika" / "magika_features.npz", allow_pickle=False) as z:
        x, names, targets = z["x"][:limit], z["y"][:limit], list(z["target_labels"])
    y = np.array([targets.index(n) if n in targets else -1 for n in names])
    cal = np.arange(len(x)) % 4 == 0
    return Task("magika_standard_v3_3", CORPUS / "models" / "magika_standard_v3_3.onnx", "bytes", x[cal], x[~cal],
                y[~cal], top1, batch=64)


def mnist(limit: int | None = None) -> Task:
    """mnist_cntk (opset 8, batch fixed at 1) on raw 0..255 pixels; 200 digits across classes calibrate."""
    with np.load(CORPUS / "data" / "mnist" / "mnist_5k.npz", allow_pickle=False) as z:
        x = z["x"].astype(np.float32)[:, None, :, :]
        y = z["y"]
    cal = np.arange(len(x)) % 25 == 0
    ex, ey = x[~cal], y[~cal]
    if limit:
        keep = np.random.default_rng(0).permutation(len(ex))[:limit]
        ex, ey = ex[keep], ey[keep]
    return Task("mnist_cntk", CORPUS / "models" / "mnist_cntk.onnx", "Input3", x[cal], ex, ey, top1, batch=1)


def sample(limit: int | None = None, name: str = "mnist_resnet") -> Task:
    """One of drpc's own MNIST models (models/), with their shipped calibration and test data."""
    models = Path(__file__).resolve().parents[1] / "models"
    with np.load(models / "mnist_calib.npz") as c, np.load(models / "mnist_test.npz") as t:
        calib, x, y = c["input"], t["input"][:limit], t["labels"][:limit]
    return Task(name, models / f"{name}.onnx", "input", calib, x, y, top1, batch=100)


def vit_sample(limit: int | None = None) -> Task:
    """drpc's own small vision transformer for MNIST (models/make_vit_sample.py)."""
    return sample(limit, "mnist_vit")


TASKS = {"efficientnet_lite0": imagenet, "ppocr_mobile_v2_cls": ocr, "magika_standard_v3_3": magika,
         "mnist_cntk": mnist, "mnist_resnet": sample, "mnist_vit": vit_sample}


def run_task(session, task: Task, x: np.ndarray | None = None) -> np.ndarray:
    """The first output of `session` over `x` (default: the evaluation inputs), batched as the model allows."""
    x = task.eval_x if x is None else x
    fixed = session.get_inputs()[0].shape[0]
    batch = fixed if isinstance(fixed, int) else task.batch
    outs = [session.run(None, {task.input_name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)
