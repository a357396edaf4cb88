"""Measured sensitivity of the model's outputs to pruning each layer, for allocating sparsity across layers.

For every prunable unit (a layer, or a channel space with the layers reading it) and a few ratios, the unit
alone is pruned (the way the pass prunes it) and the model runs on a handful of calibration samples; the
curve is the relative squared error of all model outputs against the float model. The tensors a unit changes
become graph inputs, so one onnxruntime session serves every measurement of a unit by feeding different
values; that session runs only the part of the model the unit influences, from the float model's tensors
where that part begins, and every other weight in it stays a constant (onnxruntime runs a model whose
weights are inputs 1.3-1.9x slower: it cannot prepack them). Those float tensors come from a checkpoint that
walks forward through the model with the units (see CheckpointedStream), so each unit computes only the
nodes since the one before it rather than the whole model up to where it begins.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from compiler.activations import CheckpointedStream, downstream
from compiler.runtime import make_session

SAMPLES = 32
POINTS = (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
CHECKPOINT_BYTES = 256 << 20  # the float tensors held at the checkpoint, over all samples measured on


def weights_as_inputs(proto: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of `proto` in which the initializers `names` are graph inputs instead."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    keep, moved = [], []
    for init in model.graph.initializer:
        (moved if init.name in names else keep).append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for init in moved:
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return model


class Sensitivity:
    """The output-error curves of `units`, measured point by point on demand. A unit is (key, the first node it
    changes, the constant tensors it changes); prune(key, ratio) gives those tensors' new values by name (for
    sparse pruning a unit is one layer, for channel pruning one channel space and its consumers). `floors`: the
    ratio each unit is pruned to already (an earlier step's zeros): the model as it is has the unit at its floor,
    so the points at or below it are not run and their error is 0."""

    def __init__(self, proto: onnx.ModelProto, units: list[tuple[str, str, list[str]]], calib,
                 prune: Callable[[str, float], dict[str, np.ndarray]], points=POINTS, samples: int = SAMPLES,
                 floors: dict[str, float] | None = None):
        self.proto, self.units, self.prune, self.points = proto, units, prune, tuple(points)
        self.grid = np.array((0.0, *self.points))
        sess = make_session(proto, arena=False)
        model_inputs = {i.name for i in sess.get_inputs()}
        self.feeds, self.samples = [], 0
        for batch in calib.batches(16):
            self.feeds.append({k: v for k, v in batch.items() if k in model_inputs})
            self.samples += len(next(iter(self.feeds[-1].values())))
            if self.samples >= samples:
                break
        outputs = [o.name for o in sess.get_outputs()]
        self.reference = [dict(zip(outputs, sess.run(None, f))) for f in self.feeds]
        self.energy = max(sum(float(np.sum(np.square(o, dtype=np.float64))) for ref in self.reference
                              for o in ref.values()), 1e-30)
        self.initializers = {i.name: i for i in proto.graph.initializer}
        self.errors = {key: np.where(np.array(self.points) <= (floors or {}).get(key, 0.0) + 1e-9, 0.0, np.nan)
                       for key, _, _ in units}
        self.runs = 0  # (unit, point) measurements made

    def measure(self, upto: dict[str, float], progress=None) -> None:
        """Measure each unit of `upto` at the points up to its ratio there that are not measured yet."""
        nodes = list(self.proto.graph.node)
        position = {n.name: i for i, n in enumerate(nodes)}
        checkpoint = CheckpointedStream(_Held(self.feeds, self.samples), batch_size=16, budget=CHECKPOINT_BYTES)
        for key, start, tensors in sorted(self.units, key=lambda u: position.get(u[1], 0)):  # the checkpoint's way
            if key not in upto:
                continue
            todo = [i for i, p in enumerate(self.points) if p <= upto[key] + 1e-9 and np.isnan(self.errors[key][i])]
            if todo:
                originals = {t: onnx.numpy_helper.to_array(self.initializers[t]) for t in tensors}
                variants = [{**originals, **self.prune(key, self.points[i])} for i in todo]
                errors = np.zeros(len(todo))
                if position.get(start, 0) > 0:
                    checkpoint.advance(self.proto, nodes[position[start] - 1].name)
                part_sess, batches = _influenced_part(self.proto, set(tensors), start, checkpoint, self.feeds)
                wanted = {i.name for i in part_sess.get_inputs()}
                part_outputs = [o.name for o in part_sess.get_outputs()]
                for feed, ref in zip(batches, self.reference):  # one batch of entry tensors held at a time
                    for j, weights in enumerate(variants):
                        values = part_sess.run(None, {k: v for k, v in {**feed, **weights}.items() if k in wanted})
                        errors[j] += sum(float(np.sum(np.square(out.astype(np.float64) - ref[name])))
                                         for name, out in zip(part_outputs, values))
                self.errors[key][todo] = errors / self.energy
                self.runs += len(todo)
            if progress is not None:
                progress(1)

    def curves(self) -> dict[str, np.ndarray]:
        """Per unit, the relative output error at each ratio of `grid`, non-decreasing; NaN from the first point
        not measured on."""
        out = {}
        for key, errors in self.errors.items():
            known = measured_prefix(errors)
            curve = np.full(len(self.grid), np.nan)
            curve[:known + 1] = np.maximum.accumulate(np.concatenate([[0.0], errors[:known]]))
            out[key] = curve
        return out


def measured_prefix(values: np.ndarray) -> int:
    """How many leading entries of `values` are measured (not NaN)."""
    missing = np.isnan(values)
    return int(np.argmax(missing)) if missing.any() else len(values)


def measured_curves(proto: onnx.ModelProto, units: list[tuple[str, str, list[str]]], calib,
                    prune: Callable[[str, float], dict[str, np.ndarray]], points=POINTS, samples: int = SAMPLES,
                    progress=None, floors: dict[str, float] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(grid, {unit: output error at each grid ratio}) where grid = (0, *points): every unit measured at every
    point (see `Sensitivity`)."""
    sensitivity = Sensitivity(proto, units, calib, prune, points, samples, floors)
    sensitivity.measure({key: 1.0 for key, _, _ in units}, progress)
    return sensitivity.grid, sensitivity.curves()


class _Held:
    """The feeds a Sensitivity measures on, as the calibration set a CheckpointedStream reads."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], samples: int):
        self.feeds, self.num_samples = feeds, samples

    def batches(self, batch_size: int = 16):
        return iter(self.feeds)


def _influenced_part(proto, tensors: set[str], node_name, checkpoint: CheckpointedStream, feeds):
    """(session, iterator of feeds per batch) running only the part of `proto` that `node_name` influences, with
    the constant `tensors` as graph inputs and every other weight a constant (so onnxruntime prepacks it), its
    entry tensors computed by `proto` on the same batches from `checkpoint`; the whole model when the part
    cannot be cut out."""
    part = downstream(proto, node_name)
    if part is None:
        return make_session(weights_as_inputs(proto, tensors), arena=False), iter(feeds)
    model, cut = part
    session = make_session(weights_as_inputs(model, tensors), arena=False)
    if not cut:  # the part reads graph inputs only
        return session, iter(feeds)
    return session, ({**f, **e} for f, e in zip(feeds, checkpoint.stream(proto, cut)))
