"""Streaming access to intermediate tensors: run the model once per calibration batch, one session.

Used by calibration (ranges, histograms) and pruning (layer input statistics). Memory stays bounded by
one batch of the requested tensors: callers reduce each batch before the next is computed.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx

from compiler.runtime import make_session


def with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `proto` that also exposes the tensors `names` as graph outputs (types left open)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)
    return model


def stream_activations(proto: onnx.ModelProto, names: list[str], calib, batch_size: int = 16,
                       max_samples: int | None = None, progress=None) -> Iterator[dict[str, np.ndarray]]:
    """Yield, per calibration batch, {tensor name: value} for the requested tensors.

    One onnxruntime session serves every batch (requested tensors are graph outputs, so onnxruntime's
    optimizations keep them; its memory arena is off so memory is returned after each batch).
    `progress(n)` is called with each batch size.
    """
    sess = make_session(with_outputs(proto, names), arena=False)
    inputs = {i.name for i in sess.get_inputs()}
    seen = 0
    for batch in calib.batches(batch_size):
        feed = {k: v for k, v in batch.items() if k in inputs}
        n = len(next(iter(feed.values()))) if feed and next(iter(feed.values())).ndim else 1
        if max_samples is not None and seen >= max_samples:
            break
        values = sess.run(names, feed)
        seen += n
        if progress is not None:
            progress(n)
        yield dict(zip(names, values))
