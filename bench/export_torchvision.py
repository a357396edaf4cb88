"""Export torchvision architectures to ONNX, to check that drpc compiles the models users train.

The weights are random (no download): bench/headline.py checks that each model compiles, prunes and
simulates, which does not depend on trained weights; accuracy is measured on the corpus's trained models.
Needs torch and torchvision (not drpc dependencies). Uses the TorchScript exporter, the one most deployed
models went through, at opset 17; `--dynamo` uses torch.export instead (torch.onnx.export's default since
torch 2.9: opset 18 and up, weights in a separate .onnx.data file), which also needs onnxscript.

    python bench/export_torchvision.py /tmp/zoo                      # the default set
    python bench/export_torchvision.py /tmp/zoo resnet18 vit_b_32@224
    python bench/export_torchvision.py /tmp/zoo_dynamo --dynamo
"""

from __future__ import annotations

import argparse
from pathlib import Path

# name@input size; classification at 224 unless the architecture needs another, segmentation at 320
DEFAULT = ("squeezenet1_1", "shufflenet_v2_x0_5", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small",
           "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf",
           "resnet18", "googlenet", "inception_v3@299", "densenet121", "convnext_tiny", "swin_t", "vit_b_32",
           "maxvit_t", "lraspp_mobilenet_v3_large@320", "deeplabv3_mobilenet_v3_large@320")
BACKBONED = ("lraspp", "deeplabv3", "fcn")


def import_torchvision():
    """torchvision's CUDA wheels register C++ ops that a CPU-only torch lacks, and fail at import; the model
    definitions need none of them, so their fake-kernel registration is skipped when that happens."""
    import torch
    try:
        import torchvision.models as models
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        import sys
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        torch.library.register_fake = lambda *a, **k: (lambda fn: fn)
        import torchvision.models as models
    return torch, models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("models", nargs="*", default=list(DEFAULT), help="torchvision names, optionally @input size")
    ap.add_argument("--dynamo", action="store_true", help="export through torch.export (needs onnxscript)")
    args = ap.parse_args()
    torch, models = import_torchvision()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for spec in args.models:
        name, _, size = spec.partition("@")
        extra = {"weights_backbone": None} if name.startswith(BACKBONED) else {}
        net = models.get_model(name, weights=None, **extra).eval()
        x = torch.randn(1, 3, int(size or 224), int(size or 224))
        path = args.out / f"{name}.onnx"
        if args.dynamo:
            torch.onnx.export(net, (x,), str(path), input_names=["input"], output_names=["output"], dynamo=True)
        else:
            torch.onnx.export(net, x, str(path), input_names=["input"], output_names=["output"], opset_version=17,
                              dynamo=False)
        print(f"{path} ({sum(p.numel() for p in net.parameters()):,} parameters)", flush=True)


if __name__ == "__main__":
    main()
