"""Run a command in a fresh process and measure its wall time and peak resident memory.

A child forked from a large benchmark process would inherit that process's resident-set high-water mark,
so the peak comes from GNU time around a clean exec, not from the parent's rusage.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str          # the command's own stderr, without GNU time's line
    seconds: float
    peak_mb: float

    def last_error(self, prefix: str = "", width: int = 200) -> str:
        """The last stderr line starting with `prefix` (a failed command's one-line reason)."""
        lines = [line for line in self.stderr.strip().splitlines()
                 if line.startswith(prefix) and not line.startswith(("Command exited", "[W:", "\x1b"))]
        return (lines or ["(no output)"])[-1][:width]


def run_measured(cmd: list[str], cwd: Path, timeout: float | None = None) -> Measured:
    """Run `cmd` under /usr/bin/time; a timeout counts as returncode -9 with the reason on stderr."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], capture_output=True, text=True,
                              cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Measured(-9, "", f"timed out after {timeout:.0f} s", time.perf_counter() - start, float("nan"))
    seconds = time.perf_counter() - start
    lines = proc.stderr.splitlines()
    peak = [line for line in lines if line.startswith("MAXRSS_KB ")]
    stderr = "\n".join(line for line in lines if not line.startswith("MAXRSS_KB "))
    return Measured(proc.returncode, proc.stdout, stderr, seconds,
                    int(peak[-1].split()[1]) / 1024 if peak else float("nan"))
