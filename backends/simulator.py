"""The package simulator: checks a package's structure and layout, then runs it against its reference.

`simulate(dir)` returns a SimulationReport; `ok` is True only when every check passed. Each failed check
is one line naming the file, tensor or layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from backends.deploy_schema import validate_descriptor
from backends.memory_plan import check_layout
from backends.package import PACKAGE_FILES
from backends.partition import partition
from backends.qdq_info import activation_quant_params
from compiler.errors import DrpcError, PackageError
from compiler.runtime import make_session
from compiler.target import load_target

CORRECT_ATOL, CORRECT_RTOL = 0.01, 0.001  # the Renesas-style "correct ratio" tolerance


@dataclass
class SimulationReport:
    """Checks run (name → problem lines, empty when passed) and per-output agreement metrics."""

    package: str
    checks: dict[str, list[str]] = field(default_factory=dict)
    outputs: dict[str, dict] = field(default_factory=dict)
    samples: int = 0

    @property
    def ok(self) -> bool:
        """True when no check reported a problem."""
        return not any(self.checks.values())

    def problems(self) -> list[str]:
        """Every problem line, prefixed by its check."""
        return [f"{name}: {p}" for name, probs in self.checks.items() for p in probs]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"package": self.package, "ok": self.ok, "samples": self.samples,
                "checks": {k: (v or "ok") for k, v in self.checks.items()}, "outputs": self.outputs}


def simulate(package: str | Path, data: str | Path | None = None, min_cosine: float | None = None) -> SimulationReport:
    """Validate the package at `package`; run model.onnx and reference.onnx on `data` or the package's samples."""
    root = Path(package)
    report = SimulationReport(str(root))
    if not root.is_dir():
        raise PackageError(f"{root}: not a package directory")
    missing = [f for f in PACKAGE_FILES if not (root / f).is_file()]
    report.checks["files"] = [f"{f} is missing" for f in missing]
    if missing:
        return report
    descriptor = _load_descriptor(root, report)
    model = _load_model(root / "model.onnx", report, "model")
    reference = _load_model(root / "reference.onnx", report, "reference")
    if descriptor is None or model is None or reference is None:
        return report
    target = _target(descriptor, report)
    report.checks["interface"] = _check_interface(descriptor, model, reference)
    report.checks["tensors"] = _check_tensors(descriptor, model)
    report.checks["quantization"] = _check_quantization(descriptor, model, target)
    report.checks["placement"] = _check_placement(descriptor, model, target)
    mem = descriptor["memory"]
    area = descriptor["target"].get("memory", {})
    report.checks["memory"] = check_layout(descriptor["tensors"], mem["regions"], area.get("base", 0),
                                           area.get("size", 0), area.get("alignment", 1))
    _run(root, model, reference, data, report, min_cosine)
    return report


def _load_descriptor(root: Path, report: SimulationReport) -> dict | None:
    try:
        descriptor = json.loads((root / "deploy.json").read_text())
        validate_descriptor(descriptor)
        report.checks["schema"] = []
        return descriptor
    except json.JSONDecodeError as exc:
        report.checks["schema"] = [f"deploy.json is not valid JSON ({exc.msg} at line {exc.lineno})"]
    except PackageError as exc:
        report.checks["schema"] = [str(exc)]
    return None


def _load_model(path: Path, report: SimulationReport, key: str) -> onnx.ModelProto | None:
    try:
        model = onnx.load_model(str(path))
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model)
        report.checks[key] = []
        return model
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        report.checks[key] = [f"{path.name} is not a valid ONNX model ({first})"]
        return None


def _target(descriptor, report):
    try:
        return load_target(descriptor["target"]["name"])
    except DrpcError as exc:
        report.checks["target"] = [str(exc)]
        return None


def _value_infos(model: onnx.ModelProto) -> dict[str, tuple[list, str]]:
    out = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else None
        out[vi.name] = (shape, dtype)
    for init in model.graph.initializer:
        out[init.name] = (list(init.dims), onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name)
    return out


def _check_interface(descriptor, model, reference) -> list[str]:
    problems = []
    infos = _value_infos(model)
    for kind, entries, vis in (("input", descriptor["inputs"], model.graph.input),
                               ("output", descriptor["outputs"], model.graph.output)):
        names = [v.name for v in vis if v.name not in {i.name for i in model.graph.initializer}]
        if [e["name"] for e in entries] != names:
            problems.append(f"deploy.json {kind}s {[e['name'] for e in entries]} differ from model.onnx's {names}")
        for e in entries:
            if e["name"] in infos and _shape_differs(e["shape"], infos[e["name"]][0]):
                problems.append(f"{kind} '{e['name']}': deploy.json shape {e['shape']} != model {infos[e['name']][0]}")
    ref_out = [o.name for o in reference.graph.output]
    if ref_out != [o.name for o in model.graph.output]:
        problems.append(f"reference.onnx outputs {ref_out} differ from model.onnx's")
    return problems


def _check_tensors(descriptor, model) -> list[str]:
    infos = _value_infos(model)
    problems = []
    for t in descriptor["tensors"]:
        info = infos.get(t["name"])
        if info is None:
            problems.append(f"tensor '{t['name']}' is not in model.onnx")
            continue
        shape, dtype = info
        if _shape_differs(t["shape"], shape):
            problems.append(f"tensor '{t['name']}': deploy.json shape {t['shape']} != model {shape}")
        if dtype is not None and t["dtype"] != dtype:
            problems.append(f"tensor '{t['name']}': deploy.json dtype {t['dtype']} != model {dtype}")
    return problems


def _check_quantization(descriptor, model, target) -> list[str]:
    act_q = activation_quant_params(model)
    problems = []
    for t in descriptor["tensors"]:
        q = act_q.get(t["name"])
        if q is None or isinstance(t["scale"], list):
            continue
        if t["scale"] is None or not np.isclose(t["scale"], q["scale"], rtol=1e-6, atol=0):
            problems.append(f"tensor '{t['name']}': deploy.json scale {t['scale']} != model {q['scale']:.9g}")
        if t["zero_point"] != q["zero_point"]:
            problems.append(f"tensor '{t['name']}': deploy.json zero point {t['zero_point']} != model {q['zero_point']}")
    if target is not None and target.precision == "fp16" and any(
            n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        problems.append(f"target {target.name} is fp16 but model.onnx contains QDQ nodes")
    return problems


def _check_placement(descriptor, model, target) -> list[str]:
    if target is None:
        return []
    legal = partition(model, target).engine_of
    nodes = {n.name for n in model.graph.node}
    problems = []
    for layer in descriptor["layers"]:
        if layer["name"] not in nodes:
            problems.append(f"layer '{layer['name']}' is not in model.onnx")
        elif layer["engine"] == "drpai" and legal.get(layer["name"]) != "drpai":
            problems.append(f"layer '{layer['name']}' ({layer['op']}) is placed on DRP-AI, which cannot run it on {target.name}")
    return problems


def _run(root, model, reference, data, report, min_cosine) -> None:
    from compiler.calib_data import InputSpec, load_calibration

    problems: list[str] = []
    report.checks["run"] = problems
    try:
        sess, ref = make_session(root / "model.onnx"), make_session(root / "reference.onnx")
    except Exception as exc:
        problems.append(f"onnxruntime cannot load the package: {str(exc).strip().splitlines()[0]}")
        return
    if data is not None:
        specs = [InputSpec(i.name, tuple(d if isinstance(d, int) else None for d in i.shape),
                           np.dtype(_np_type(i.type))) for i in sess.get_inputs()]
        feeds = load_calibration(data, specs).batches(16)
    elif (root / "sample_inputs.npz").is_file():
        with np.load(root / "sample_inputs.npz", allow_pickle=False) as z:
            feeds = [{k: z[k] for k in z.files}]
    else:
        problems.append("no --data given and the package has no sample_inputs.npz")
        return
    acc: dict[str, dict] = {}
    for feed in feeds:
        got = sess.run(None, feed)
        want = ref.run(None, {k: v for k, v in feed.items() if k in {i.name for i in ref.get_inputs()}})
        report.samples += len(next(iter(feed.values()))) if feed else 0
        for out, a, b in zip(sess.get_outputs(), got, want):
            _accumulate(acc.setdefault(out.name, {}), np.asarray(a), np.asarray(b))
    if data is None and (root / "reference_outputs.npz").is_file():
        with np.load(root / "reference_outputs.npz", allow_pickle=False) as z:
            for out, b in zip(ref.get_outputs(), ref.run(None, feeds[0])):
                if out.name in z.files and not np.allclose(z[out.name], b, rtol=1e-4, atol=1e-5):
                    problems.append(f"reference.onnx output '{out.name}' differs from reference_outputs.npz")
    for name, m in acc.items():
        metrics = _finish(m)
        report.outputs[name] = metrics
        if not metrics["finite"]:
            problems.append(f"output '{name}' has NaN or Inf")
        if metrics["shape_mismatch"]:
            problems.append(f"output '{name}' shape differs from the reference")
        if min_cosine is not None and metrics["cosine"] < min_cosine:
            problems.append(f"output '{name}': cosine {metrics['cosine']:.4f} < required {min_cosine}")


def _accumulate(m: dict, a: np.ndarray, b: np.ndarray) -> None:
    m.setdefault("shape_mismatch", False)
    m.setdefault("finite", True)
    if a.shape != b.shape:
        m["shape_mismatch"] = True
        return
    if a.dtype.kind not in "fc":
        m["exact"] = m.get("exact", 0) + int(np.count_nonzero(a == b))
        m["n"] = m.get("n", 0) + a.size
        return
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    m["finite"] &= bool(np.isfinite(a64).all())
    diff = np.abs(a64 - b64)
    m["max_abs"] = max(m.get("max_abs", 0.0), float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)))
    m["sum_abs"] = m.get("sum_abs", 0.0) + float(np.nan_to_num(diff).sum())
    m["n"] = m.get("n", 0) + a.size
    m["dot"] = m.get("dot", 0.0) + float(np.nan_to_num(a64 * b64).sum())
    m["aa"] = m.get("aa", 0.0) + float(np.nan_to_num(a64 * a64).sum())
    m["bb"] = m.get("bb", 0.0) + float((b64 * b64).sum())
    m["correct"] = m.get("correct", 0) + int(np.count_nonzero(np.isclose(a64, b64, atol=CORRECT_ATOL, rtol=CORRECT_RTOL)))
    if a.ndim >= 2 and a.shape[-1] > 1:
        m["top1_same"] = m.get("top1_same", 0) + int(np.count_nonzero(a.argmax(-1) == b.argmax(-1)))
        m["top1_n"] = m.get("top1_n", 0) + int(np.prod(a.shape[:-1]))


def _finish(m: dict) -> dict:
    n = max(m.get("n", 0), 1)
    if "exact" in m:
        return {"finite": True, "shape_mismatch": m["shape_mismatch"], "exact_ratio": m["exact"] / n, "cosine": 1.0}
    denom = np.sqrt(m.get("aa", 0.0) * m.get("bb", 0.0))
    out = {
        "finite": m["finite"], "shape_mismatch": m["shape_mismatch"],
        "max_abs_error": m.get("max_abs", 0.0), "mean_abs_error": m.get("sum_abs", 0.0) / n,
        "cosine": float(m.get("dot", 0.0) / denom) if denom > 0 else (1.0 if m.get("bb", 0.0) == 0 else 0.0),
        "correct_ratio": m.get("correct", 0) / n,
    }
    if m.get("top1_n"):
        out["top1_agreement"] = m["top1_same"] / m["top1_n"]
    return out


def _shape_differs(a, b) -> bool:
    if len(a) != len(b):
        return True
    return any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a, b))


def _np_type(ort_type: str):
    table = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
             "tensor(int8)": np.int8, "tensor(bool)": np.bool_}
    return table.get(ort_type, np.float32)
