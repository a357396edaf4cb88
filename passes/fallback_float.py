"""fallback-float: keep the activations that hurt most in float until an accuracy budget is met."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Option, Pass, register_pass
from compiler.rewrite import replace_uses
from compiler.runtime import make_session
from passes.quant_common import activation_qdq_pairs

EVAL_SAMPLES = 64


@register_pass
class FallbackFloat(Pass):
    """Measure the quantized model against the float model it was quantized from (after pruning) on
    calibration data and, while the drop
    exceeds `max_drop` points, remove the activation Q/DQ pair with the lowest SQNR (that tensor stays float).

    The drop is the top-1 disagreement with fp32 in points for classifier-like outputs (last dim > 1), else
    100 x (1 - cosine similarity). Guarantees: the drop never grows (a removal that makes it worse is undone);
    stops as soon as the budget is met or every pair was tried; each pair it removes is reported per layer
    (`kept_float`).
    """

    name = "fallback-float"
    OPTIONS = {"max_drop": Option(float, 1.0, "accuracy budget in points", minimum=0.0, maximum=100.0),
               "max_steps": Option(int, 64, "pairs removed at most", minimum=1)}

    def run(self, module, ctx) -> bool:
        reference_model = getattr(ctx, "float_model", None)
        if ctx is None or ctx.calib is None or reference_model is None:
            return False
        feed_batches = list(_limited(ctx.calib.batches(16), EVAL_SAMPLES))
        reference = make_session(reference_model)
        want = [reference.run(None, _inputs(reference, b)) for b in feed_batches]
        removed = []
        drop = self._drop(module, feed_batches, want)
        initial = drop
        sqnr = {name: facts.get("quant_sqnr_db") for name, facts in ctx.layers.items() if "quant_sqnr_db" in facts}
        tried: set[str] = set()
        for _ in range(self.max_steps):
            pairs = [p for p in activation_qdq_pairs(module.graph) if _producer_name(p[0]) not in tried]
            if drop <= self.max_drop or not pairs:
                break
            q, dq = min(pairs, key=lambda p: sqnr.get(_producer_name(p[0]), 99.0))
            name = _producer_name(q)
            tried.add(name)
            before = module.to_proto()
            replace_uses(dq.outputs[0], q.inputs[0])
            q.inputs.clear()
            dq.outputs.clear()
            module.graph.cleanup(remove_unused_graph_inputs=False)
            new_drop = self._drop(module, feed_batches, want)
            if new_drop > drop:  # keeping this tensor float made it worse: undo
                module.graph = gs.import_onnx(before)
                continue
            drop = new_drop
            removed.append(name)
            ctx.layer(name, kept_float=True)
        ctx.log(max_drop=self.max_drop, drop_before=round(initial, 3), drop_after=round(drop, 3), kept_float=removed)
        if drop > self.max_drop:
            ctx.warn(f"accuracy budget --max-drop {self.max_drop} not met: drop {drop:.2f} points on calibration data")
        return bool(removed)

    @staticmethod
    def _drop(module, batches, want) -> float:
        sess = make_session(module.to_proto())
        got = [sess.run(None, _inputs(sess, b)) for b in batches]
        worst = 0.0
        for k in range(len(want[0])):
            a = np.concatenate([g[k] for g in got]).astype(np.float64)
            b = np.concatenate([w[k] for w in want]).astype(np.float64)
            if a.ndim >= 2 and a.shape[-1] > 1:
                worst = max(worst, 100.0 * float(np.mean(a.argmax(-1) != b.argmax(-1))))
            else:
                denom = np.linalg.norm(a) * np.linalg.norm(b)
                worst = max(worst, 100.0 * (1.0 - float((a.ravel() @ b.ravel()) / denom)) if denom else 0.0)
        return worst


def _producer_name(q) -> str:
    t = q.inputs[0]
    return t.inputs[0].name if t.inputs else t.name


def _inputs(sess, batch) -> dict:
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in batch.items() if k in names}


def _limited(batches, n):
    seen = 0
    for b in batches:
        if seen >= n:
            return
        seen += len(next(iter(b.values()))) if b and next(iter(b.values())).ndim else 1
        yield b
