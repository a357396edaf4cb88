"""Measured sensitivity of the model's outputs to pruning each layer, for allocating sparsity across layers.

For every prunable unit (a layer, or a channel space with the layers reading it) and a few ratios, the unit
alone is pruned (the way the pass prunes it) and the model runs on a handful of calibration samples; the
curve is the relative squared error of all model outputs against the float model. The tensors a unit changes
become graph inputs, so one onnxruntime session serves every measurement of a unit by feeding different
values; that session runs only the part of the model the unit influences, from the float model's tensors
where that part begins.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from compiler.activations import downstream, stream_activations
from compiler.runtime import make_session

SAMPLES = 32
POINTS = (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


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


def measured_curves(proto: onnx.ModelProto, units: list[tuple[str, str, list[str]]], calib,
                    prune: Callable[[str, float], dict[str, np.ndarray]], points=POINTS, samples: int = SAMPLES,
                    progress=None, floors: dict[str, float] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(grid, {unit: output error at each grid ratio}) where grid = (0, *points). A unit is (key, the first
    node it changes, the constant tensors it changes); prune(key, ratio) gives those tensors' new values by
    name (for sparse pruning a unit is one layer, for channel pruning one channel space and its consumers).
    `floors`: the ratio each unit is pruned to already (an earlier step's zeros). The model as it is has the
    unit at its floor, so the ratios at or below it are not run and their error is 0."""
    floors = floors or {}
    names = {t for _, _, tensors in units for t in tensors}
    originals = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.name in names}
    movable = weights_as_inputs(proto, names)
    sess = make_session(movable, arena=False)
    model_inputs = {i.name for i in sess.get_inputs()} - names
    feeds, seen = [], 0
    for batch in calib.batches(16):
        feeds.append({k: v for k, v in batch.items() if k in model_inputs})
        seen += len(next(iter(feeds[-1].values())))
        if seen >= samples:
            break
    outputs = [o.name for o in sess.get_outputs()]
    reference = [dict(zip(outputs, sess.run(None, {**f, **originals}))) for f in feeds]
    energy = sum(float(np.sum(np.square(o, dtype=np.float64))) for ref in reference for o in ref.values())
    curves = {}
    for key, start, _ in units:
        first = int(np.searchsorted(points, floors.get(key, 0.0) + 1e-9))  # the points above the floor
        variants = [{**originals, **prune(key, ratio)} for ratio in points[first:]]
        errors = np.zeros(len(points))
        if variants:
            part_sess, batches = _influenced_part(proto, movable, start, calib, feeds, seen) or (sess, iter(feeds))
            wanted = {i.name for i in part_sess.get_inputs()}
            part_outputs = [o.name for o in part_sess.get_outputs()]
            for feed, ref in zip(batches, reference):  # one batch of entry tensors held at a time
                for i, weights in enumerate(variants, first):
                    values = part_sess.run(None, {k: v for k, v in {**feed, **weights}.items() if k in wanted})
                    errors[i] += sum(float(np.sum(np.square(out.astype(np.float64) - ref[name])))
                                     for name, out in zip(part_outputs, values))
        curves[key] = np.maximum.accumulate(np.concatenate([[0.0], errors / max(energy, 1e-30)]))
        if progress is not None:
            progress(1)
    return np.array((0.0, *points)), curves


def _influenced_part(proto, movable, node_name, calib, feeds, samples):
    """(session, iterator of feeds per batch) running only the part of `movable` that `node_name` influences,
    its entry tensors computed by the float `proto` on the same batches; None when it cannot be cut out."""
    part = downstream(movable, node_name)
    if part is None:
        return None
    model, cut = part
    if not cut:  # the part reads graph inputs only
        return make_session(model, arena=False), iter(feeds)
    entries = stream_activations(proto, cut, calib, batch_size=16, max_samples=samples)
    return make_session(model, arena=False), ({**f, **e} for f, e in zip(feeds, entries))
