"""What passes share while a pipeline runs: target, calibration data, options, the report and progress."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np


@dataclass
class PassRecord:
    """What one pass did: whether it changed the IR, how long it took, and the facts it logged."""

    name: str
    changed: bool = False
    seconds: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)


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
        name = self.current_pass.name if self.current_pass is not None else "compile"
        if not self.records or self.records[-1].name != name:
            self.records.append(PassRecord(name))
        self.records[-1].facts.update(facts)

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
        """A progress bar on a terminal (quiet in CI and pipes); yields `advance(n=1)`."""
        if not self.show_progress:
            yield lambda n=1: None
            return
        from rich.progress import Progress

        with Progress(transient=True, console=_stderr_console()) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)


def wants_progress(json_output: bool) -> bool:
    """Progress bars only on an interactive terminal, never in CI or with --json."""
    return not json_output and sys.stderr.isatty() and not os.environ.get("CI")


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
