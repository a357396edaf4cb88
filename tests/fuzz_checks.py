"""The differential checks run on every fuzzed graph (by tests/test_fuzz.py and bench/fuzz.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from backends.simulator import simulate
from compiler.api import compile_model
from compiler.errors import PassError, UnsupportedModelError


def check_model(model: onnx.ModelProto, seed: int = 0) -> list[str]:
    """Problems found for one model (empty when it passed):

    1. the full rzv2h pipeline compiles it with --verify on (every lossless pass is held to onnxruntime's
       outputs on the original within 1e-4 relative) and the simulator accepts the package;
    2. channel pruning at 0.5 gives a package the simulator accepts, or refuses with UnsupportedModelError;
       so does channel pruning without the target's channel alignment, which removes single channels and
       attention heads the alignment would keep.
    """
    from compiler.pipeline import default_pipeline_text
    from compiler.target import load_target

    unaligned = default_pipeline_text(load_target("rzv2h"), 0.5, "channel").replace("mode=channel}",
                                                                                   "mode=channel,round_to=1}")
    problems = []
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    with tempfile.TemporaryDirectory(prefix="drpc-fuzz-") as tmp:
        tmp = Path(tmp)
        onnx.save(model, tmp / "m.onnx")
        np.save(tmp / "calib.npy", np.random.default_rng(seed).standard_normal([8] + shape[1:]).astype(np.float32))
        for label, extra in (("int8", {}), ("channel-0.5", {"prune": 0.5, "prune_mode": "channel"}),
                             ("channel-0.5-unaligned", {"pipeline": unaligned})):
            out = tmp / label
            try:
                compile_model(tmp / "m.onnx", "rzv2h", out, calib=tmp / "calib.npy", **extra)
            except (UnsupportedModelError, PassError) as exc:
                refused = isinstance(exc, UnsupportedModelError) or isinstance(exc.__cause__, UnsupportedModelError)
                if label == "int8" or not refused:
                    problems.append(f"{label}: {exc}")
                continue
            except Exception as exc:  # any other failure is a bug
                problems.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            report = simulate(out)
            if not report.ok:
                problems.append(f"{label}: simulator refused: {report.problems()[0]}")
    return problems
