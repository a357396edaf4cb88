"""onnxruntime sessions for drpc: running a model in memory or on disk, with quiet logging."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from compiler.errors import UnsupportedModelError
from compiler.ir import PROTOBUF_LIMIT, save_proto

ort.set_default_logger_severity(4)  # onnxruntime's own error lines would reach the user's terminal


def session_options(threads: int = 0, optimize: bool = True, arena: bool = True) -> ort.SessionOptions:
    """SessionOptions with warnings silenced; `threads` 0 lets onnxruntime choose; `arena` False returns
    memory after each run (for sessions that expose many intermediate tensors).

    Q/DQ pairs run as written (DequantizeLinear, the float op, QuantizeLinear), never fused into onnxruntime's
    int8 kernels: what those compute depends on the host CPU (on x86 without VNNI, u8 x s8 products are summed
    in pairs into saturating int16, which cost efficientnet_lite0's int8 package 2.9 points of top-1), while
    the accelerator accumulates int8 products exactly. Unfused, a quantized model gives the target's answers
    on every host, and every choice drpc makes by running one (fallback-float, the checks) is host-independent."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors reach the user as one line through drpc's own exceptions
    opts.intra_op_num_threads = threads
    opts.enable_cpu_mem_arena = arena
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


def make_session(model: onnx.ModelProto | str | Path, threads: int = 0, optimize: bool = True,
                 arena: bool = True) -> ort.InferenceSession:
    """An InferenceSession on the CPU for a ModelProto (through a temp file past 2 GiB) or a path."""
    opts = session_options(threads, optimize, arena)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, Path)):
        return ort.InferenceSession(str(model), opts, providers=providers)
    if model.ByteSize() < PROTOBUF_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    with tempfile.TemporaryDirectory(prefix="drpc-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_proto(model, path)
        return ort.InferenceSession(str(path), opts, providers=providers)


def run_model(model, feed: dict[str, np.ndarray], output_names: list[str] | None = None) -> list[np.ndarray]:
    """Run `model` once on `feed` (extra feed entries the model does not take are ignored)."""
    try:
        sess = model if isinstance(model, ort.InferenceSession) else make_session(model)
        wanted = {i.name for i in sess.get_inputs()}
        return sess.run(output_names, {k: v for k, v in feed.items() if k in wanted})
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.RuntimeException, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.NotImplemented) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"onnxruntime cannot run the model: {text}") from None
