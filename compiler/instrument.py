"""Instrumentation for the pass manager: records, IR dumps with diffs, verification, numeric checks.

None of these change the IR; each hooks `before_pass`/`after_pass` of `PassInstrumentation`.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
import onnx

from compiler.context import PassRecord
from compiler.errors import PassError
from compiler.passmanager import PassInstrumentation
from compiler.runtime import run_model


class Recorder(PassInstrumentation):
    """Keeps a PassRecord (changed, seconds, facts) per pass in `ctx.records`."""

    def before_pass(self, p, module, ctx):
        ctx.records.append(PassRecord(p.name))

    def after_pass(self, p, module, ctx, changed, seconds):
        ctx.records[-1].changed = changed
        ctx.records[-1].seconds = seconds


class DumpIR(PassInstrumentation):
    """Writes the IR after every pass that changed it as `NNN_pass.txt`, `NNN_pass.onnx` and `NNN_pass.diff`.

    `000_input.*` is the IR before the first pass; NNN counts passes that ran, so gaps show unchanged passes.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.count = 0
        self.previous: tuple[str, str] | None = None

    def before_pipeline(self, module, ctx):
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write("000_input", module, None)

    def after_pass(self, p, module, ctx, changed, seconds):
        self.count += 1
        if changed:
            self._write(f"{self.count:03d}_{p.name}", module, self.previous)

    def _write(self, stem, module, previous):
        text = module.text() + "\n"
        (self.directory / f"{stem}.txt").write_text(text)
        module.save(self.directory / f"{stem}.onnx", infer_shapes=False)
        if previous is not None:
            prev_stem, prev_text = previous
            diff = difflib.unified_diff(prev_text.splitlines(True), text.splitlines(True),
                                        fromfile=f"{prev_stem}.txt", tofile=f"{stem}.txt")
            (self.directory / f"{stem}.diff").write_text("".join(diff))
        self.previous = (stem, text)


class Verifier(PassInstrumentation):
    """After each pass that changed the IR, onnx's checker must accept the exported model."""

    def after_pass(self, p, module, ctx, changed, seconds):
        if not changed:
            return
        proto = module.to_proto()
        try:
            if proto.ByteSize() < 2**31 - 2**26:
                onnx.checker.check_model(proto)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PassError(f"pass '{p.name}' produced an invalid model: {first}") from None


class LosslessCheck(PassInstrumentation):
    """Holds every lossless pass to its promise: outputs equal the original model's within `rtol`.

    The error of an output is max|new - original| / max(max|original|, 1e-6) over the sample feed, where
    "original" is the model as the last lossy pass (pruning, quantization) or precision-changing pass
    (its own `lossless_rtol`) left it. A model that amplifies float rounding on the feed (outputs from a
    saturated Sigmoid, activations in the thousands) moves by more than `rtol` when its float inputs move by
    a few units in the last place: a pass is then allowed NOISE_FACTOR times that movement.
    """

    NOISE_FACTOR = 10.0

    def __init__(self, feed: dict[str, np.ndarray], rtol: float = 1e-4):
        self.feed = feed
        self.rtol = rtol
        self.expected: list[np.ndarray] | None = None
        self.noise = 0.0  # how far rounding-sized input changes move the expected outputs
        self.stale = True  # no outputs taken yet
        self.worst: dict[str, float] = {}

    def before_pipeline(self, module, ctx):
        self.expected, self.stale = None, True  # taken before the first lossless pass, from the model it gets

    def before_pass(self, p, module, ctx):
        if p.lossless and self.stale:  # none taken yet, or a lossy pass ran since: take them anew
            self._expect(module.to_proto())
            self.stale = False

    def after_pass(self, p, module, ctx, changed, seconds):
        if changed and not p.lossless:
            self.stale = True
        if not (changed and p.lossless) or self.expected is None:
            return
        proto = module.to_proto()
        got = run_model(proto, self.feed)
        names = [t.name for t in module.graph.outputs]
        rtol = getattr(p, "lossless_rtol", None) or self.rtol
        for name, want, have in zip(names, self.expected, got):
            err = relative_error(want, have)
            self.worst[p.name] = max(self.worst.get(p.name, 0.0), err)
            if not err <= max(rtol, self.NOISE_FACTOR * self.noise):
                raise PassError(f"lossless pass '{p.name}' changed output '{name}' by {err:.3g} relative "
                                f"(limit {rtol:g}; float rounding of the inputs alone moves it by {self.noise:.3g})")
        if rtol != self.rtol:  # the pass changed the precision: later passes answer to its outputs
            self._expect(proto, got)

    def _expect(self, proto, outputs: list[np.ndarray] | None = None) -> None:
        """Take `proto`'s outputs on the feed (`outputs` when already run) as the expected ones, and how far they
        move when every float input moves by up to two units in the last place (the model's own amplification
        of rounding)."""
        rng = np.random.default_rng(0)
        moved = {k: (v * (1 + 2 * np.finfo(v.dtype).eps * rng.uniform(-1, 1, v.shape))).astype(v.dtype)
                 if v.dtype.kind == "f" else v for k, v in self.feed.items()}
        self.expected = outputs if outputs is not None else run_model(proto, self.feed)
        self.noise = max((relative_error(want, have) for want, have in zip(self.expected, run_model(proto, moved))),
                         default=0.0)


class ReferenceSnapshot(PassInstrumentation):
    """Keeps the model as it is after the leading lossless (and float-source) passes in `ctx.reference`
    (reference.onnx)."""

    def before_pass(self, p, module, ctx):
        if ctx.reference is None and not p.lossless and not getattr(p, "makes_float_source", False):
            ctx.reference = module.to_proto()

    def after_pipeline(self, module, ctx):
        if ctx.reference is None:
            ctx.reference = module.to_proto()


def relative_error(want: np.ndarray, have: np.ndarray) -> float:
    """max |have - want| over max |want| (float outputs), or 0/1 exact match for other dtypes."""
    want, have = np.asarray(want), np.asarray(have)
    if want.shape != have.shape:
        return float("inf")
    if want.dtype.kind not in "fc":
        return 0.0 if np.array_equal(want, have) else 1.0
    want64, have64 = want.astype(np.float64), have.astype(np.float64)
    finite = np.isfinite(want64)
    if not np.array_equal(finite, np.isfinite(have64)):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(float(np.abs(want64[finite]).max()), 1e-6)
    return float(np.abs(have64[finite] - want64[finite]).max()) / scale
