"""Train and export a second sample model: a small vision transformer for MNIST digits.

It is there to exercise what transformers bring to a compiler (Linear layers on [batch, tokens, features],
LayerNorm, attention, GELU) on a model with trained weights; the same data split as make_sample.py.
Needs PyTorch (not a drpc dependency): `pip install torch==2.13.0 && python models/make_vit_sample.py`.
Writes models/mnist_vit.onnx (calibrate with models/mnist_calib.npz, test on models/mnist_test.npz).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from make_sample import load_split, train

HERE = Path(__file__).resolve().parent
DIM, HEADS, HIDDEN, DEPTH, PATCH = 64, 4, 192, 4, 7


class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention and an MLP, each added to the stream."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (DIM // HEADS) ** -0.5, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, DIM))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, DIM, PATCH, PATCH)
        self.pos = nn.Parameter(torch.randn(1, (28 // PATCH) ** 2, DIM) * 0.02)
        self.blocks = nn.Sequential(*[Block() for _ in range(DEPTH)])
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def train_and_export(make_net, name: str, epochs: int, dynamic_batch: bool) -> None:
    """Seed, build with `make_net`, train on the shared split, export to models/NAME with the TorchScript exporter
    (opset 17; the batch axis dynamic or 1) and check onnxruntime agrees with PyTorch on the test digits."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x_test, y_test, x_train, y_train = load_split()
    net = make_net()
    train(net, x_train, y_train, x_test, y_test, epochs=epochs, max_lr=2e-3)
    path = HERE / name
    net.eval()
    axes = {"dynamic_axes": {"input": {0: "N"}, "logits": {0: "N"}}} if dynamic_batch else {}
    torch.onnx.export(net, (torch.from_numpy(x_test[:1]),), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False, **axes)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    chunks = [x_test] if dynamic_batch else [x_test[i:i + 1] for i in range(len(x_test))]
    logits = np.concatenate([sess.run(None, {"input": c})[0] for c in chunks])
    with torch.no_grad():
        ref = net(torch.from_numpy(x_test)).numpy()
    assert np.abs(logits - ref).max() < 1e-3, "onnxruntime disagrees with PyTorch"
    ops = sorted({n.op_type for n in model.graph.node})
    print(f"onnxruntime test accuracy {(logits.argmax(1) == y_test).mean():.4f}; ops {ops}")


def main() -> None:
    train_and_export(ViT, "mnist_vit.onnx", epochs=15, dynamic_batch=True)


if __name__ == "__main__":
    main()
