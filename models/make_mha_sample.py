"""Train and export a third sample model: the small MNIST transformer built from PyTorch's own layers.

make_vit_sample.py writes its attention by hand, as timm does. Many users build theirs from
`nn.TransformerEncoderLayer`, whose `nn.MultiheadAttention` exports differently: one packed in_proj for q, k and v
on [tokens, batch, features], unflattened and gathered into parts, heads folded into the batch axis. Same data
split, patch embedding and sizes as the ViT sample (4 pre-norm layers, 64 features, 4 heads, feed-forward 192,
GELU), exported at batch 1 as edge deployments run it. Needs PyTorch (not a drpc dependency):
`pip install torch==2.13.0 && python models/make_mha_sample.py`. Writes models/mnist_mha.onnx.

`python models/make_mha_sample.py --dynamic` loads the weights of models/mnist_mha.onnx back into `Net` and
exports them again with a dynamic batch (models/mnist_mha_dynamic.onnx), the form `dynamic_axes` gives: the
attention's reshapes then read the batch at run time and fold the heads into it.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from make_vit_sample import DEPTH, DIM, HEADS, HERE, HIDDEN, PATCH, ViT, train_and_export


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
    if "--dynamic" in sys.argv[1:]:
        export_dynamic()
    else:
        train_and_export(Net, "mnist_mha.onnx", epochs=10, dynamic_batch=False)


def export_dynamic() -> None:
    """models/mnist_mha.onnx's weights, exported again by the TorchScript exporter with a dynamic batch. Its
    initializers carry the parameter names, except the MatMul constants [in, out] of the Linears (in_proj for
    '/blocks/layers.0/self_attn/MatMul', linear1 for '/blocks/layers.0/linear1/MatMul')."""
    source = onnx.load(str(HERE / "mnist_mha.onnx"))
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in source.graph.initializer}
    for node in source.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            path = node.name.strip("/").split("/")[:-1]  # blocks, layers.0, linear1
            key = ".".join(path + ["in_proj_weight" if path[-1] == "self_attn" else "weight"])
            weights[key] = weights[node.input[1]].T
    net = Net()
    state = net.state_dict()
    missing = [k for k in state if k not in weights]
    assert not missing, f"weights not in mnist_mha.onnx: {missing}"
    net.load_state_dict({k: weights[k] for k in state})
    net.eval()
    x = np.load(HERE / "mnist_test.npz")["input"][:64]
    path = HERE / "mnist_mha_dynamic.onnx"
    torch.onnx.export(net, (torch.from_numpy(x[:1]),), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False, dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    dynamic = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    fixed = ort.InferenceSession(str(HERE / "mnist_mha.onnx"), providers=["CPUExecutionProvider"])
    one_by_one = np.concatenate([fixed.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    diff = float(np.abs(dynamic - one_by_one).max())
    assert diff < 1e-4, f"the two exports disagree by {diff}"
    print(f"{path.name}: max |difference| from mnist_mha.onnx {diff:.2e}")


if __name__ == "__main__":
    main()
