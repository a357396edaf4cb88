"""Writing a deployment package atomically: everything goes to a temporary folder renamed at the end.

An interrupted or failed write leaves no package and no temporary folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from compiler.errors import DrpcError, UsageError

PACKAGE_FILES = ("model.onnx", "reference.onnx", "deploy.json", "addr_map.txt", "report.json", "report.html")


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse an existing output folder (unless `force`) or one whose parent cannot be written; missing
    parent folders are created."""
    if out_dir.exists() and not force:
        raise UsageError(f"{out_dir}: output directory exists (use --force to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a directory")
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{out_dir}: cannot create parent directory {parent} ({exc.strerror or exc})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{out_dir}: parent directory {parent} is not writable")


@contextlib.contextmanager
def staged_directory(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` in one rename."""
    check_out_dir(out_dir, force)
    parent = out_dir.resolve().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
    except OSError as exc:
        raise UsageError(f"{out_dir}: parent directory {parent} is not writable ({exc.strerror or exc})") from None
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
            os.replace(out_dir, old / "pkg")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DrpcError(f"{out_dir}: cannot write the package ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data) -> None:
    """JSON with stable key order and numpy values converted."""
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz of named arrays (sample inputs or reference outputs)."""
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
