"""What passes share while a pipeline runs: target, calibration data, options, the report and progress."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np


@dataclass
class PassRecord:
    """What one pass did: whether it changed the IR, how long it took (in all, and in each of its phases: the
    steps it showed progress for, summed by description), and the facts it logged."""

    name: str
    changed: bool = False
    seconds: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class CompileContext:
    """State shared by the passes of one compile; passes record facts with `log` and `layer`."""

    target: Any = None
    calib: Any = None                      # compiler.calib_data.CalibrationSet or None
    options: dict[str, Any] = field(default_factory=dict)
    records: list[PassRecord] = field(default_factory=list)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    reference: Any = None                  # ModelProto snapshot after the lossless passes
    float_model: Any = None                # ModelProto right before quantization (after pruning)
    show_progress: bool = False
    current_pass: Any = None
    instrumentations: Any = None
    pass_history: Any = None

    def log(self, **facts: Any) -> None:
        """Attach facts to the record of the pass now running (shown in report.json)."""
        self._record().facts.update(facts)

    def _record(self) -> PassRecord:
        """The record of the pass now running (one named 'compile' outside a pass)."""
        name = self.current_pass.name if self.current_pass is not None else "compile"
        if not self.records or self.records[-1].name != name:
            self.records.append(PassRecord(name))
        return self.records[-1]

    def layer(self, node_name: str, **facts: Any) -> None:
        """Record per-layer facts (sparsity, quantization error, ...) under the node's name."""
        self.layers.setdefault(node_name, {}).update(facts)

    def warn(self, message: str) -> None:
        """A warning the CLI shows and the report keeps."""
        self.warnings.append(message)

    def sample_inputs(self, n: int = 2) -> dict[str, np.ndarray] | None:
        """The first `n` calibration samples as one feed, or None without calibration data."""
        return None if self.calib is None else self.calib.first(n)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Any]:
        """One phase of the running pass: a progress bar on a terminal (quiet in CI and pipes), yielding
        `advance(n=1)`; its time is added to the pass record's phases under `description`."""
        record, start = self._record(), time.perf_counter()
        try:
            if not self.show_progress:
                yield lambda n=1: None
                return
            from rich.progress import Progress

            with Progress(transient=True, console=_stderr_console()) as bar:
                task = bar.add_task(description, total=total)
                yield lambda n=1: bar.advance(task, n)
        finally:
            record.phases[description] = record.phases.get(description, 0.0) + time.perf_counter() - start


def wants_progress(json_output: bool) -> bool:
    """Progress bars only on an interactive terminal, never in CI or with --json."""
    return not json_output and sys.stderr.isatty() and not os.environ.get("CI")


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
