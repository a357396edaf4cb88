"""Train and export the shipped sample model: a small residual CNN for MNIST digits.

Needs PyTorch (not a drpc dependency): `pip install torch==2.13.0 && python models/make_sample.py`.
Reads ../shared/corpus/data/mnist/mnist_5k.npz (sorted by class), shuffles it with seed 0, tests on the
first 1000 shuffled samples and trains on the other 4000.
Writes models/mnist_resnet.onnx, models/mnist_calib.npz (200 training samples) and models/mnist_test.npz.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "corpus" / "data" / "mnist" / "mnist_5k.npz"
MEAN, STD = 0.1307, 0.3081


def conv_bn(cin, cout, stride=1, groups=1, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 16)
        self.res1 = Residual(16)
        self.down = conv_bn(16, 32, stride=2)
        self.dw = conv_bn(32, 32, groups=32)
        self.pw = conv_bn(32, 32, k=1)
        self.pool = nn.MaxPool2d(2)
        self.res2 = Residual(32)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = self.res1(torch.relu(self.stem(x)))
        x = torch.relu(self.down(x))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        x = self.res2(self.pool(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(torch.relu(self.fc1(x)))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x_test, y_test (the first 1000 shuffled samples), x_train, y_train (the other 4000), normalized NCHW."""
    data = np.load(DATA)
    x = ((data["x"].astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
    y = data["y"].astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return x[:1000], y[:1000], x[1000:], y[1000:]


def train(net: nn.Module, x_train, y_train, x_test, y_test, epochs: int = 8, max_lr: float = 4e-3) -> None:
    """Adam with a one-cycle schedule, batches of 64 shifted by up to 2 pixels; prints test accuracy per epoch."""
    opt = torch.optim.Adam(net.parameters(), lr=max_lr / 2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=epochs * (len(x_train) // 64))
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt) - 63, 64):
            idx = perm[i:i + 64]
            batch = xt[idx]
            shift = torch.randint(-2, 3, (2,))  # small translations
            batch = torch.roll(batch, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = nn.functional.cross_entropy(net(batch), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            acc = (net(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
        print(f"epoch {epoch}: loss {loss.item():.3f} test accuracy {acc:.4f}")


def main() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(2)
    x_test, y_test, x_train, y_train = load_split()
    net = Net()
    train(net, x_train, y_train, x_test, y_test)

    path = HERE / "mnist_resnet.onnx"
    net.eval()
    torch.onnx.export(net, torch.from_numpy(x_test[:1]), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=13,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False, dynamo=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" in ops, "BatchNormalization was folded by the exporter"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x_test})[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x_test)).numpy()
    assert np.abs(logits - ref).max() < 1e-3, "onnxruntime disagrees with PyTorch"
    print(f"onnxruntime test accuracy {(logits.argmax(1) == y_test).mean():.4f}; ops {sorted(set(ops))}")
    np.savez_compressed(HERE / "mnist_calib.npz", input=x_train[:200])
    np.savez_compressed(HERE / "mnist_test.npz", input=x_test, labels=y_test)


if __name__ == "__main__":
    main()
