"""Export torchvision (or timm) architectures to ONNX, to check that drpc compiles the models users train.

The weights are random (no download): bench/headline.py checks that each model compiles, prunes and
simulates, which does not depend on trained weights; accuracy is measured on the corpus's trained models.
Needs torch and torchvision, and timm for timm: names (not drpc dependencies). Uses the TorchScript exporter,
the one most deployed models went through, at opset 17; `--dynamo` uses torch.export instead (torch.onnx.export's
default since torch 2.9: opset 18 and up, weights in a separate .onnx.data file), which also needs onnxscript.

    python bench/export_torchvision.py /tmp/zoo                      # the default set
    python bench/export_torchvision.py /tmp/zoo resnet18 vit_b_32@224
    python bench/export_torchvision.py /tmp/zoo_dynamo --dynamo
    python bench/export_torchvision.py /tmp/zoo_dyn --dynamic-batch   # dynamic_axes on the batch, as most exports
    python bench/export_torchvision.py /tmp/timm --timm                 # timm's edge architectures (pip install timm)
    python bench/export_torchvision.py /tmp/timm timm:mobilevit_xs
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
# timm architectures made for phones and edge boards (timm: prefix), including re-parameterizable ones
# (RepVGG, MobileOne, FastViT) in their training form and hybrid conv/attention ones
TIMM = tuple("timm:" + n for n in (
    "mobilenetv4_conv_small", "ghostnet_100", "lcnet_100", "rexnet_100", "repvgg_a0", "mobilevit_xs", "mobilevitv2_050",
    "efficientvit_b0", "fastvit_t8", "hgnetv2_b0", "levit_128s", "edgenext_xx_small", "mobileone_s0", "tinynet_a",
    "fbnetv3_b", "hardcorenas_a", "convnextv2_atto", "cs3darknet_s", "dla34", "efficientformerv2_s0",
    "repghostnet_100", "ese_vovnet19b_dw"))


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
    ap.add_argument("models", nargs="*", default=list(DEFAULT), help="torchvision names (timm:NAME for timm's), optionally @input size")
    ap.add_argument("--dynamo", action="store_true", help="export through torch.export (needs onnxscript)")
    ap.add_argument("--timm", action="store_true", help="timm's edge architectures instead of the default set")
    ap.add_argument("--dynamic-batch", action="store_true", help="export the batch axis as dynamic (dynamic_axes)")
    args = ap.parse_args()
    if args.timm and args.models == list(DEFAULT):
        args.models = list(TIMM)
    torch, models = import_torchvision()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for spec in args.models:
        name, _, size = spec.partition("@")
        if name.startswith("timm:"):
            import timm

            name = name[len("timm:"):]
            net = timm.create_model(name, pretrained=False).eval()
        else:
            extra = {"weights_backbone": None} if name.startswith(BACKBONED) else {}
            net = models.get_model(name, weights=None, **extra).eval()
        x = torch.randn(1, 3, int(size or 224), int(size or 224))
        path = args.out / f"{name}.onnx"
        if args.dynamo:
            torch.onnx.export(net, (x,), str(path), input_names=["input"], output_names=["output"], dynamo=True)
        else:
            dynamic = {"input": {0: "batch"}, "output": {0: "batch"}} if args.dynamic_batch else None
            torch.onnx.export(net, x, str(path), input_names=["input"], output_names=["output"], opset_version=17,
                              dynamo=False, dynamic_axes=dynamic)
        print(f"{path} ({sum(p.numel() for p in net.parameters()):,} parameters)", flush=True)


if __name__ == "__main__":
    main()
