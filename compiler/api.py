"""drpc's public Python API: compile a model into a package, inspect a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from compiler.calib_data import ImagePreprocess, InputSpec, load_calibration
from compiler.context import CompileContext
from compiler.errors import DrpcError, UnsupportedModelError, UsageError
from compiler.instrument import DumpIR, LosslessCheck, Recorder, ReferenceSnapshot, Verifier
from compiler.ir import Module, batch_one_flags
from compiler.pipeline import default_pipeline_text, parse_pipeline
from compiler.target import load_target

CALIB_METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
PRUNE_MODES = ("sparse", "channel")


def drpc_version() -> str:
    """The installed drpc version."""
    try:
        return version("drpc")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class CompileResult:
    """What a compile produced: the package folder, its descriptor, and what the passes did."""

    out_dir: Path
    pipeline: str
    descriptor: dict
    records: list
    warnings: list[str] = field(default_factory=list)
    lossless_error: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A compact, JSON-ready summary (the CLI's --json output)."""
        totals = self.descriptor["totals"]
        return {
            "package": str(self.out_dir),
            "target": self.descriptor["target"]["name"],
            "pipeline": self.pipeline,
            "accuracy_measured": self.descriptor["provenance"]["accuracy_measured"],
            "passes": [{"name": r.name, "changed": r.changed, "seconds": round(r.seconds, 4)} for r in self.records],
            "totals": totals,
            "lossless_max_relative_error": self.lossless_error,
            "warnings": self.warnings,
        }


def input_specs(module: Module) -> list[InputSpec]:
    """The model's real inputs (not initializers) as InputSpecs for calibration loading."""
    specs = []
    for t in module.graph.inputs:
        shape = tuple(d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else None)
                      for d in (t.shape or []))
        specs.append(InputSpec(t.name, shape, np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)))
    return specs


def resolve_pipeline(target, pipeline: str | None, prune: float, prune_mode: str | None,
                     calib_method: str | None, max_drop: float | None = None) -> str:
    """The pipeline text to run: `pipeline` as given, or the target's default with --prune/--calib-method/--max-drop."""
    if pipeline is None:
        return default_pipeline_text(target, prune, prune_mode, calib_method, max_drop)
    pm = parse_pipeline(pipeline)
    for p in _flatten(pm):
        if p.name == "prune" and prune > 0 and "ratio" not in p.given:
            p.given["ratio"] = p.ratio = prune
    return pm.text()


def compile_model(model_path: str | Path, target: str = "rzv2h", out_dir: str | Path | None = None, *,
                  prune: float = 0.0, prune_mode: str | None = None, calib: str | Path | None = None,
                  calib_method: str | None = None, calib_samples: int | None = None,
                  preprocess: ImagePreprocess | None = None, pipeline: str | None = None,
                  exclude: list[str] | tuple[str, ...] = (), max_drop: float | None = None,
                  dump_ir: str | Path | None = None, verify: bool = True, force: bool = False,
                  input_shapes: dict[str, list[int]] | None = None, show_progress: bool = False,
                  seed: int = 0) -> CompileResult:
    """Compile `model_path` for `target` into the package folder `out_dir` (default: `<model stem>_<target>`).

    The input file is never modified; the package appears only when everything succeeded.
    """
    from backends.emit import PackageInputs, emit_package
    from backends.package import check_out_dir

    if not 0.0 <= prune < 1.0:
        raise UsageError(f"--prune {prune}: the pruning ratio must be in [0, 1)")
    if prune_mode is not None and prune_mode not in PRUNE_MODES:
        raise UsageError(f"--prune-mode {prune_mode}: must be one of {', '.join(PRUNE_MODES)}")
    if calib_method is not None and calib_method not in CALIB_METHODS:
        raise UsageError(f"--calib-method {calib_method}: must be one of {', '.join(CALIB_METHODS)}")
    if calib_samples is not None and calib_samples < 1:
        raise UsageError(f"--calib-samples {calib_samples}: must be at least 1")
    if max_drop is not None and not 0.0 <= max_drop <= 100.0:
        raise UsageError(f"--max-drop {max_drop}: must be a number of points in [0, 100]")
    tgt = load_target(target)
    model_path = Path(model_path)
    out = Path(out_dir) if out_dir is not None else Path(f"{model_path.stem}_{tgt.name}")
    check_out_dir(out, force)
    text = resolve_pipeline(tgt, pipeline, prune, prune_mode, calib_method, max_drop)
    pm = parse_pipeline(text)

    module = Module.load(model_path)
    if input_shapes:
        set_input_shapes(module, input_shapes)
    data = load_calibration(calib, input_specs(module), max_samples=calib_samples, preprocess=preprocess, seed=seed)
    probed = probe_synthetic_shapes(module, seed) if data.synthetic and not input_shapes else {}
    if probed:
        set_input_shapes(module, probed)
        data = load_calibration(None, input_specs(module), seed=seed)
    fixed = fix_symbolic_dims(module, data)
    ctx = CompileContext(target=tgt, calib=data, show_progress=show_progress,
                         options={"exclude": list(exclude), "seed": seed,
                                  "preprocessing": _preprocessing_facts(preprocess, module)})
    for node_name, path in module.torch_modules.items():
        ctx.layer(node_name, pytorch_module=path)
    if data.synthetic:
        ctx.warn("no --calib data: calibrated on synthetic inputs, accuracy is UNMEASURED")
    for name, shape in fixed.items():
        ctx.warn(f"input '{name}' has symbolic dims: compiled for shape {shape} (from the calibration data)")
    for name, shape in probed.items():
        ctx.warn(f"input '{name}' has symbolic dims and no --calib data: compiled for shape {shape}, the first "
                 f"size the model runs with (give --input-shape to choose)")
    check = LosslessCheck(data.first(2)) if verify else None
    hooks = [Recorder(), ReferenceSnapshot()]
    if verify:
        hooks += [Verifier(), check]
    if dump_ir is not None:
        hooks.append(DumpIR(dump_ir))
    for hook in hooks:
        pm.instrument(hook)
    try:
        pm.run(module, ctx)
    except DrpcError as exc:
        if data.synthetic and "onnxruntime cannot run" in str(exc):
            raise UnsupportedModelError(f"{exc} (on synthetic inputs {_shapes(data.first(1))}: give --calib data "
                                        f"or --input-shape NAME=d0,d1,...)") from None
        raise

    batch_note = dynamic_batch_note(module.graph)
    if batch_note:
        ctx.warn(batch_note)
    final = module.to_proto(infer_shapes=True)
    package = PackageInputs(model=final, reference=ctx.reference, target=tgt, ctx=ctx, source_path=model_path,
                            pipeline=text, drpc_version=drpc_version())
    descriptor = emit_package(package, out, force)
    return CompileResult(out_dir=out, pipeline=text, descriptor=descriptor, records=ctx.records,
                         warnings=ctx.warnings, lossless_error=dict(check.worst) if check else {})


def dynamic_batch_note(graph) -> str:
    """A warning when the compiled graph still reads shapes at run time (Shape nodes fold-constants could not
    fold, as they depend on a dynamic batch): that arithmetic runs on the CPU, and in channel mode it can block
    the channels it reads. DRP-AI runs one frame at a time, so the fix is compiling for batch 1."""
    shapes = sum(n.op == "Shape" for n in graph.nodes)
    flags = batch_one_flags(graph)
    if not shapes or not flags:
        return ""
    return (f"the model computes shapes from a dynamic batch at run time ({shapes} Shape nodes): that arithmetic "
            f"runs on the CPU and blocks channel pruning where it reads channels; {' '.join(flags)} compiles for "
            f"batch 1, as DRP-AI runs")


def set_input_shapes(module: Module, shapes: dict[str, list[int]]) -> None:
    """Fix the shapes of named graph inputs (UsageError for an unknown name or a rank mismatch)."""
    inputs = {t.name: t for t in module.graph.inputs}
    for name, shape in shapes.items():
        if name not in inputs:
            raise UsageError(f"--input-shape {name}: the model has no input '{name}' (inputs: {', '.join(inputs)})")
        old = inputs[name].shape
        if old is not None and len(old) != len(shape):
            raise UsageError(f"--input-shape {name}: rank {len(shape)} given, the input has rank {len(old)}")
        inputs[name].shape = list(shape)
    module.infer_shapes()


def fix_symbolic_dims(module: Module, data) -> dict[str, list]:
    """Give symbolic non-batch input dims the calibration data's sizes (the batch dim stays symbolic)."""
    sample = data.first(1)
    fixed = {}
    for t in module.graph.inputs:
        shape = list(t.shape or [])
        if t.name not in sample or len(shape) < 2 or all(isinstance(d, int) and d >= 0 for d in shape[1:]):
            continue
        got = sample[t.name].shape
        if len(got) != len(shape):
            continue
        new = [shape[0]] + [d if isinstance(d, int) and d >= 0 else int(g) for d, g in zip(shape[1:], got[1:])]
        t.shape = new
        fixed[t.name] = ["N" if not isinstance(new[0], int) else new[0]] + new[1:]
    if fixed:
        module.infer_shapes()
    return fixed


PROBE_SIZES = (1, 16, 64, 256, 512, 1024)


def probe_synthetic_shapes(module: Module, seed: int = 0) -> dict[str, list[int]]:
    """For non-image inputs with symbolic non-batch dims and no calibration data: the first size from
    PROBE_SIZES (same for every such dim; batch 1) with which onnxruntime runs the model, or {}."""
    from compiler.runtime import make_session

    symbolic = {t.name: t for t in module.graph.inputs if t.shape is not None and len(t.shape) != 4
                and any(not (isinstance(d, int) and d >= 0) for d in t.shape[1:])}
    if not symbolic:
        return {}
    batch_names = {t.shape[0] for t in module.graph.inputs if t.shape and isinstance(t.shape[0], str)}
    proto = module.to_proto()
    session = None
    for size in PROBE_SIZES:
        def dim(i, d):
            if isinstance(d, int) and d >= 0:
                return d
            return 1 if i == 0 or d in batch_names else size  # batch dims (by name) stay 1 everywhere

        shapes = {name: [dim(i, d) for i, d in enumerate(t.shape)] for name, t in symbolic.items()}
        specs = [InputSpec(s.name, tuple(shapes.get(s.name, s.shape)), s.dtype) for s in input_specs(module)]
        try:
            session = session or make_session(proto)
            session.run(None, load_calibration(None, specs, seed=seed).first(1))
            return shapes
        except Exception:  # this size does not run: try the next one
            continue
    return {}


def parse_input_shapes(items: list[str]) -> dict[str, list[int]]:
    """`NAME=d0,d1,...` strings into a dict; UsageError naming the bad item."""
    shapes = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")] if dims else []
        except ValueError:
            raise UsageError(f"--input-shape {item!r}: expected NAME=d0,d1,... with integer dims") from None
        if not name or any(d < 1 for d in shapes[name]):
            raise UsageError(f"--input-shape {item!r}: expected NAME=d0,d1,... with positive dims")
    return shapes


def _shapes(feed: dict) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items())


def _flatten(pm):
    for p in pm.passes:
        if hasattr(p, "passes"):
            yield from _flatten(p)
        else:
            yield p


def _preprocessing_facts(preprocess: ImagePreprocess | None, module: Module) -> dict:
    if preprocess is None:
        return {}
    image_inputs = [t.name for t in module.graph.inputs if t.shape is not None and len(t.shape) == 4]
    facts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(preprocess).items()}
    return {name: facts for name in image_inputs[:1]}
