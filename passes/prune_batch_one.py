"""Channel pruning of a dynamic-batch model on its batch-1 form, for the model to keep its dynamic batch.

torch's attention folds the heads into the batch (`view(T, B * heads, d)`): with B dynamic, the axis holding the
heads has no size the channel analysis can split, so it blocks the heads, and through them the residual
stream. With the batch at 1 that axis is the heads alone. The pruning's rewrites are of weights and of the
channel entries of Reshape/Split/Slice constants, and the entries that hold the batch (0 or -1, as
fold-constants leaves them) are kept, so a model pruned at batch 1 runs at any batch. `check_any_batch`
measures that it does on calibration samples rather than assuming it.
"""

from __future__ import annotations

import numpy as np

from compiler.errors import UnsupportedModelError
from compiler.ir import Module, batch_one_flags, set_batch_one
from compiler.runtime import make_session


def batch_one_copy(module: Module) -> Module:
    """A copy of `module` whose graph inputs' dynamic first dims are 1, inner shapes inferred."""
    proto = module.to_proto()
    del proto.graph.value_info[:]
    set_batch_one(proto.graph)
    out = Module.from_proto(proto, source=module.source)
    out.infer_shapes()
    return out


def restore_batch(pruned: Module, original: Module) -> None:
    """Give `original` the graph of `pruned` (a `batch_one_copy` of it, pruned), with the original's first dims
    of the graph inputs and outputs back and inner shapes inferred again."""
    first = {t.name: t.shape[0] for t in original.graph.inputs + original.graph.outputs if t.shape}
    for t in pruned.graph.inputs + pruned.graph.outputs:
        if t.shape and t.name in first:
            t.shape = [first[t.name], *t.shape[1:]]
    original.graph = pruned.graph
    original.reinfer_shapes()


def check_any_batch(module: Module, calib, samples: int = 2) -> None:
    """Run `module` on `samples` calibration samples as one batch and one by one; the outputs must agree (to
    float rounding), else an UnsupportedModelError names the batch-1 compile that avoids the question."""
    feed = calib.first(samples)
    n = len(next(iter(feed.values())))
    if n < 2:
        return
    session = make_session(module.to_proto(), arena=False)
    try:
        together = session.run(None, feed)
        alone = [session.run(None, {k: v[i:i + 1] for k, v in feed.items()}) for i in range(n)]
    except Exception as exc:  # onnxruntime's errors have no common type
        raise _not_batch_independent(module, f"it fails at batch {n}: {str(exc).splitlines()[0]}") from None
    for k, out in enumerate(together):
        one_by_one = np.concatenate([a[k] for a in alone])
        scale = max(float(np.abs(one_by_one).max(initial=0.0)), 1.0)
        if out.shape != one_by_one.shape or float(np.abs(out - one_by_one).max(initial=0.0)) > 1e-4 * scale:
            raise _not_batch_independent(module, f"output {k} differs between batch {n} and batch 1")


def _not_batch_independent(module: Module, why: str) -> UnsupportedModelError:
    flags = batch_one_flags(module.graph)
    fix = f"; compile it for batch 1 ({flags[0]})" if flags else ""
    return UnsupportedModelError(f"channel pruning on the model's batch-1 form left a model that does not keep its "
                                 f"dynamic batch: {why}{fix}")
