"""Export Ultralytics YOLO detectors to ONNX the way their users do, to check that drpc compiles them.

YOLO is the model family most often deployed on DRP-AI boards. The weights are random (built from the
architecture's .yaml, no download): bench/headline.py checks that each model compiles, prunes and
simulates, which does not depend on trained weights. Ultralytics' own exporter is used (`model.export(
format="onnx")`: TorchScript exporter, opset 18 with torch 2.13, onnxslim simplification when it is
installed). Needs the `ultralytics` package, which is not a drpc dependency and pins its own versions of
common packages, so install it in a virtual environment that sees this one's torch:

    python -m venv --system-site-packages /tmp/yolo-venv && /tmp/yolo-venv/bin/pip install ultralytics onnxslim
    YOLO_OFFLINE=1 /tmp/yolo-venv/bin/python bench/export_yolo.py /tmp/yolo
    python bench/headline.py /tmp/yolo/*.onnx
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# detection (anchor-free head with DFL), its segmentation and pose variants, and two later generations
# (yolo11: attention block C2PSA; yolov10: NMS-free head with TopK in the graph)
DEFAULT = ("yolov8n", "yolov8n-seg", "yolov8n-pose", "yolo11n", "yolov10n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("models", nargs="*", default=list(DEFAULT))
    ap.add_argument("--imgsz", type=int, default=320, help="square input size")
    args = ap.parse_args()
    from ultralytics import YOLO

    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        exported = Path(YOLO(f"{name}.yaml").export(format="onnx", imgsz=args.imgsz, dynamic=False))
        shutil.move(exported, args.out / exported.name)
        print(args.out / exported.name)


if __name__ == "__main__":
    main()
