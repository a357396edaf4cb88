"""drpc's public Python API: compile a model into a package, inspect a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from compiler.calib_data import ImagePreprocess, InputSpec, load_calibration
from compiler.context import CompileContext
from compiler.errors import UsageError
from compiler.instrument import DumpIR, LosslessCheck, Recorder, ReferenceSnapshot, Verifier
from compiler.ir import Module
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
        shape = tuple(d if isinstance(d, int) else (d or None) for d in (t.shape or []))
        specs.append(InputSpec(t.name, shape, np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)))
    return specs


def resolve_pipeline(target, pipeline: str | None, prune: float, prune_mode: str | None,
                     calib_method: str | None) -> str:
    """The pipeline text to run: `pipeline` as given, or the target's default with --prune/--calib-method."""
    if pipeline is None:
        return default_pipeline_text(target, prune, prune_mode, calib_method)
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
                  show_progress: bool = False, seed: int = 0) -> CompileResult:
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
    text = resolve_pipeline(tgt, pipeline, prune, prune_mode, calib_method)
    pm = parse_pipeline(text)

    module = Module.load(model_path)
    data = load_calibration(calib, input_specs(module), max_samples=calib_samples, preprocess=preprocess, seed=seed)
    ctx = CompileContext(target=tgt, calib=data, show_progress=show_progress,
                         options={"exclude": list(exclude), "max_drop": max_drop, "seed": seed,
                                  "preprocessing": _preprocessing_facts(preprocess, module)})
    if data.synthetic:
        ctx.warn("no --calib data: calibrated on synthetic inputs, accuracy is UNMEASURED")
    check = LosslessCheck(data.first(2)) if verify else None
    hooks = [Recorder(), ReferenceSnapshot()]
    if verify:
        hooks += [Verifier(), check]
    if dump_ir is not None:
        hooks.append(DumpIR(dump_ir))
    for hook in hooks:
        pm.instrument(hook)
    pm.run(module, ctx)

    final = module.to_proto(infer_shapes=True)
    package = PackageInputs(model=final, reference=ctx.reference, target=tgt, ctx=ctx, source_path=model_path,
                            pipeline=text, drpc_version=drpc_version())
    descriptor = emit_package(package, out, force)
    return CompileResult(out_dir=out, pipeline=text, descriptor=descriptor, records=ctx.records,
                         warnings=ctx.warnings, lossless_error=dict(check.worst) if check else {})


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
