"""Passes, the pass registry and the pass manager.

A pass is a class with a registered `name`, typed options, and `run(module, ctx) -> bool` that says whether
it changed the IR. `PassManager` is itself a pass holding a list of passes, so pipelines nest and other
tools can embed one. Debugging is done by instrumentation objects the manager calls around every pass,
never by code inside the passes.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from compiler.errors import DrpcError, PassError, UsageError

_REGISTRY: dict[str, type["Pass"]] = {}


class Option:
    """A declared pass option: its type (bool, int, float, str, or list for ';'-separated strings), default and help."""

    def __init__(self, type_: type, default: Any, help: str, choices: tuple | None = None,
                 minimum: float | None = None, maximum: float | None = None, exclusive_max: bool = False):
        self.type, self.default, self.help, self.choices = type_, default, help, choices
        self.minimum, self.maximum, self.exclusive_max = minimum, maximum, exclusive_max

    def convert(self, pass_name: str, key: str, raw: Any) -> Any:
        """Turn the text (or value) `raw` into the option's type, checking choices and range."""
        try:
            if self.type is bool and isinstance(raw, str):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value = raw.lower() in ("true", "1", "yes")
            elif self.type is list:
                value = [s for s in raw.split(";") if s] if isinstance(raw, str) else list(raw)
            else:
                value = self.type(raw)
        except (TypeError, ValueError):
            raise UsageError(f"pass '{pass_name}': option {key}={raw!r} is not a {self.type.__name__}") from None
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"pass '{pass_name}': option {key}={value!r} must be one of {', '.join(map(str, self.choices))}")
        too_big = self.maximum is not None and (value >= self.maximum if self.exclusive_max else value > self.maximum)
        if (self.minimum is not None and value < self.minimum) or too_big:
            bracket = ")" if self.exclusive_max else "]"
            raise UsageError(f"pass '{pass_name}': option {key}={value} is outside [{self.minimum}, {self.maximum}{bracket}")
        return value


class Pass:
    """Base of every pass. Subclasses set `name`, `OPTIONS`, `lossless`, and implement `run`.

    `lossless` passes promise outputs equal to the input model's up to float rounding; the pass manager's
    numeric-check instrumentation holds them to it. A lossless pass that changes the arithmetic precision
    (half to single) sets `lossless_rtol` to the rounding it may show; later passes are then held to the
    outputs it gives.
    """

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    lossless_rtol: ClassVar[float | None] = None
    # A lossy pass that only turns the given model into the float model drpc compiles (strip-quantization):
    # reference.onnx, what the package is checked against, is taken after it.
    makes_float_source: ClassVar[bool] = False
    OPTIONS: ClassVar[dict[str, Option]] = {}

    def __init__(self, **options: Any):
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise UsageError(f"pass '{self.name}' has no option {', '.join(sorted(unknown))}"
                             f" (options: {', '.join(self.OPTIONS) or 'none'})")
        self.given = {k: self.OPTIONS[k].convert(self.name, k, v) for k, v in options.items()}
        for key, opt in self.OPTIONS.items():
            setattr(self, key, self.given.get(key, opt.default))

    def run(self, module, ctx) -> bool:  # pragma: no cover - abstract
        """Transform `module` in place; return True when the IR changed."""
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        """The first sentence of the pass's docstring."""
        paragraph = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        end = paragraph.find(". ")
        return paragraph if end < 0 else paragraph[: end + 1]

    def __str__(self) -> str:
        if not self.given:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_format_value(v)}" for k, v in self.given.items()) + "}"

    def __repr__(self) -> str:
        return f"<pass {self}>"


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make `cls` available to pipelines under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no pass name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (importing `passes` registers drpc's own)."""
    import passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_REGISTRY.items()))


def create_pass(name: str, options: dict[str, Any]) -> Pass:
    """Instantiate the registered pass `name` with `options`; UsageError for an unknown name."""
    known = registered_passes()
    if name not in known:
        raise UsageError(f"unknown pass '{name}' (see `drpc passes`)")
    return known[name](**options)


class PassInstrumentation:
    """Hooks the pass manager calls around every pass; subclasses override what they need."""

    def before_pipeline(self, module, ctx) -> None:
        """Called once before the outermost pipeline's first pass."""

    def before_pass(self, p: Pass, module, ctx) -> None:
        """Called before `p` runs."""

    def after_pass(self, p: Pass, module, ctx, changed: bool, seconds: float) -> None:
        """Called after `p` returned; `changed` is what it reported."""

    def after_pipeline(self, module, ctx) -> None:
        """Called once after the outermost pipeline's last pass."""


class PassManager(Pass):
    """Runs a list of passes in order with instrumentation; registered as the nestable pass `pipeline(...)`."""

    name = "pipeline"

    def __init__(self, passes: list[Pass] | None = None, instrumentations: list[PassInstrumentation] | None = None):
        super().__init__()
        self.passes = list(passes or [])
        self.instrumentations = list(instrumentations or [])
        self.lossless = all(p.lossless for p in self.passes)

    def add(self, p: Pass) -> "PassManager":
        """Append a pass; returns self so calls chain."""
        self.passes.append(p)
        self.lossless = self.lossless and p.lossless
        return self

    def instrument(self, inst: PassInstrumentation) -> "PassManager":
        """Attach an instrumentation; returns self."""
        self.instrumentations.append(inst)
        return self

    def run(self, module, ctx) -> bool:
        """Run every pass; instrumentation of enclosing managers also sees the passes nested here."""
        outer = getattr(ctx, "instrumentations", None)
        top = outer is None
        hooks = self.instrumentations if top else outer + self.instrumentations
        ctx.instrumentations = hooks
        history = getattr(ctx, "pass_history", None)
        if history is None:
            ctx.pass_history = history = []
        try:
            if top:
                for inst in hooks:
                    inst.before_pipeline(module, ctx)
            changed_any = False
            for p in self.passes:
                if isinstance(p, PassManager):
                    changed_any |= p.run(module, ctx)
                    continue
                changed_any |= self._run_one(p, module, ctx, hooks, history)
            if top:
                for inst in hooks:
                    inst.after_pipeline(module, ctx)
            return changed_any
        finally:
            ctx.instrumentations = outer

    @staticmethod
    def _run_one(p: Pass, module, ctx, hooks, history) -> bool:
        before = ", ".join(history) or "none"
        try:
            for inst in hooks:
                inst.before_pass(p, module, ctx)
            ctx.current_pass = p
            start = time.perf_counter()
            changed = bool(p.run(module, ctx))
            seconds = time.perf_counter() - start
            ctx.current_pass = None
            for inst in hooks:
                inst.after_pass(p, module, ctx, changed, seconds)
        except PassError:
            raise
        except DrpcError as exc:
            err = PassError(f"pass '{p.name}' failed: {exc} (passes before it: {before})")
            err.exit_code = exc.exit_code
            raise err from exc
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            raise PassError(f"pass '{p.name}' failed with an internal error: {type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
                            f"(passes before it: {before})") from exc
        history.append(str(p))
        return changed

    def __str__(self) -> str:
        return "pipeline(" + self.text() + ")"

    def text(self) -> str:
        """The pipeline as text, parseable by `parse_pipeline` back into an equal pipeline."""
        return ",".join(str(p) for p in self.passes)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(map(str, value))
    if isinstance(value, float):
        return repr(value)
    return str(value)
