"""Train and export a third sample model: the small MNIST transformer built from PyTorch's own layers.

make_vit_sample.py writes its attention by hand, as timm does. Many users build theirs from
`nn.TransformerEncoderLayer`, whose `nn.MultiheadAttention` exports differently: one packed in_proj for q, k and v
on [tokens, batch, features], unflattened and gathered into parts, heads folded into the batch axis. Same data
split, patch embedding and sizes as the ViT sample (4 pre-norm layers, 64 features, 4 heads, feed-forward 192,
GELU), exported at batch 1 as edge deployments run it. Needs PyTorch (not a drpc dependency):
`pip install torch==2.13.0 && python models/make_mha_sample.py`. Writes models/mnist_mha.onnx.
"""

from __future__ import annotations

import torch
from torch import nn

from make_vit_sample import DEPTH, DIM, HEADS, HIDDEN, PATCH, ViT, train_and_export


class Net(ViT):
    """The ViT sample with its hand-written blocks replaced by PyTorch's encoder layers."""

    def __init__(self):
        nn.Module.__init__(self)
        self.patch = nn.Conv2d(1, DIM, PATCH, PATCH)
        self.pos = nn.Parameter(torch.randn(1, (28 // PATCH) ** 2, DIM) * 0.02)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, HIDDEN, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 10)


def main() -> None:
    train_and_export(Net, "mnist_mha.onnx", epochs=10, dynamic_batch=False)


if __name__ == "__main__":
    main()
