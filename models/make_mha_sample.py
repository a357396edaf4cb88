"""Train and export a third sample model: the small MNIST transformer built from PyTorch's own layers.

make_vit_sample.py writes its attention by hand, as timm does. Many users build theirs from
`nn.TransformerEncoderLayer`, whose `nn.MultiheadAttention` exports differently: one packed in_proj for q, k and v
on [tokens, batch, features], unflattened and gathered into parts, heads folded into the batch axis. Same data
split, patch embedding and sizes as the ViT sample (4 pre-norm layers, 64 features, 4 heads, feed-forward 192,
GELU), exported at batch 1 as edge deployments run it. Needs PyTorch (not a drpc dependency):
`pip install torch==2.13.0 && python models/make_mha_sample.py`. Writes models/mnist_mha.onnx.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from make_sample import HERE, load_split, train
from make_vit_sample import DEPTH, DIM, HEADS, HIDDEN, PATCH


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, DIM, PATCH, PATCH)
        self.pos = nn.Parameter(torch.randn(1, (28 // PATCH) ** 2, DIM) * 0.02)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, HIDDEN, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(x)).mean(dim=1))


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x_test, y_test, x_train, y_train = load_split()
    net = Net()
    train(net, x_train, y_train, x_test, y_test, epochs=10, max_lr=2e-3)
    net.eval()
    path = HERE / "mnist_mha.onnx"
    torch.onnx.export(net, (torch.from_numpy(x_test[:1]),), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": x_test[i:i + 1]})[0] for i in range(len(x_test))])
    with torch.no_grad():
        ref = net(torch.from_numpy(x_test)).numpy()
    assert np.abs(logits - ref).max() < 1e-3, "onnxruntime disagrees with PyTorch"
    print(f"onnxruntime test accuracy {(logits.argmax(1) == y_test).mean():.4f}")


if __name__ == "__main__":
    main()
