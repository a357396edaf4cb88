"""Export the shipped sample networks again through torch.export, the exporter `torch.onnx.export` uses by default
since torch 2.9, so the tests can check that drpc compiles both forms of the same trained models.

Needs PyTorch (not a drpc dependency): `pip install torch==2.13.0 onnxscript && python models/export_dynamo_sample.py`.
Loads the weights of models/mnist_resnet.onnx into make_sample's `Net` (the initializers carry the PyTorch
parameter names) and writes models/mnist_resnet_dynamo.onnx with the weights inside the file. The two exports
differ where the exporters do: opset 20, BatchNormalization folded into the convolutions, ReduceMean
for the adaptive average pool, Reshape for the flatten, node and tensor names. Likewise models/mnist_vit.onnx
into make_vit_sample's `ViT` (its Linear weights are the transposed MatMul constants of the layers named after
them) → models/mnist_vit_dynamo.onnx: Slice + Squeeze instead of Split for q, k and v, Reshapes with
allowzero=1 and constant targets, Gelu as one op.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from make_sample import HERE, Net
from make_vit_sample import ViT


def load_weights(net: torch.nn.Module, source: onnx.ModelProto) -> torch.nn.Module:
    """`net` with the parameters of the TorchScript export `source`: initializers named after them, or the constant
    weight [in, out] of the MatMul named after a Linear ('/blocks/blocks.0/qkv/MatMul' for blocks.0.qkv)."""
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in source.graph.initializer}
    for node in source.graph.node:
        parts = node.name.strip("/").split("/")  # '/blocks/blocks.0/qkv/MatMul' → blocks.0.qkv.weight
        if node.op_type == "MatMul" and node.input[1] in weights and len(parts) >= 3:
            weights.setdefault(f"{parts[-3]}.{parts[-2]}.weight", weights[node.input[1]].T)
    state = net.state_dict()
    missing = [k for k in state if k not in weights and not k.endswith("num_batches_tracked")]
    assert not missing, f"weights not in the ONNX model: {missing}"
    net.load_state_dict({k: weights.get(k, v) for k, v in state.items()})
    return net.eval()


def main() -> None:
    for name, net in (("mnist_resnet", Net()), ("mnist_vit", ViT())):
        export(name, load_weights(net, onnx.load(str(HERE / f"{name}.onnx"))))


def export(name: str, net: torch.nn.Module) -> None:
    x = np.load(HERE / "mnist_test.npz")["input"][:64]
    path = HERE / f"{name}_dynamo.onnx"
    batch = torch.export.Dim("N", min=1, max=1024)
    torch.onnx.export(net, (torch.from_numpy(x[:1]),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_shapes={"x": {0: batch}}, external_data=False, dynamo=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)

    def run(p):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    diff = float(np.abs(run(path) - run(HERE / f"{name}.onnx")).max())
    assert diff < 1e-4, f"the two exports disagree by {diff}"
    print(f"{path.name}: opset {model.opset_import[0].version}, ops {sorted({n.op_type for n in model.graph.node})}, "
          f"max |difference| from {name}.onnx {diff:.2e}")


if __name__ == "__main__":
    main()
