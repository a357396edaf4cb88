"""The `drpc` command line (typer). User errors become one line on stderr and exit code 1 or 2."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from backends.report_html import before_after
from compiler.context import wants_progress
from compiler.errors import DrpcError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="drpc: compile float ONNX models into int8/fp16 deployment packages for DRP-AI targets.")
out = Console(highlight=False, soft_wrap=True)


@app.command("compile")
def compile_cmd(
    model: Path = typer.Argument(..., help="Float ONNX model to compile (never modified)."),
    target: str = typer.Option("rzv2h", "--target", "-t", help="Target name (see `drpc targets`)."),
    prune: float = typer.Option(0.0, "--prune", help="Fraction of prunable weights to remove, in [0, 1)."),
    prune_mode: Optional[str] = typer.Option(None, "--prune-mode", help="sparse | channel (default: the target's)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration data: .npy, .npz or a folder of images."),
    calib_method: Optional[str] = typer.Option(None, "--calib-method", help="minmax | percentile | entropy | mse | auto."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Use at most N calibration samples."),
    calib_size: Optional[str] = typer.Option(None, "--calib-size", help="Image size for a folder: 224 or HxW."),
    calib_mean: Optional[str] = typer.Option(None, "--calib-mean", help="Per-channel mean on 0..255 pixels, e.g. 127,127,127."),
    calib_std: Optional[str] = typer.Option(None, "--calib-std", help="Per-channel std on 0..255 pixels, e.g. 128."),
    calib_layout: Optional[str] = typer.Option(None, "--calib-layout", help="NCHW | NHWC (default: from the model)."),
    calib_order: Optional[str] = typer.Option(None, "--calib-order", help="RGB | BGR | GRAY."),
    calib_resize: Optional[str] = typer.Option(None, "--calib-resize", help="crop | stretch | pad."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Package folder (default: <model>_<target>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing package folder."),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="Write the IR after every pass that changed it."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", help="Pass pipeline text replacing the target's default."),
    print_pipeline: bool = typer.Option(False, "--print-pipeline", help="Print the pipeline that would run and exit."),
    input_shape: Optional[List[str]] = typer.Option(None, "--input-shape", help="Fix an input's shape: NAME=d0,d1,... (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Node name or op type to keep in float (repeatable)."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Accuracy budget in points vs fp32 on the calibration data."),
    timing: bool = typer.Option(False, "--timing", help="Show the time each pass took."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the model and lossless passes' outputs after each pass."),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Compile MODEL into a deployment package for a target."""
    from compiler.api import compile_model, parse_input_shapes, resolve_pipeline
    from compiler.calib_data import parse_preprocess
    from compiler.target import load_target

    if print_pipeline:
        text = resolve_pipeline(load_target(target), pipeline, prune, prune_mode, calib_method, max_drop)
        typer.echo(text)
        return
    preprocess = None
    if any(v is not None for v in (calib_size, calib_mean, calib_std, calib_layout, calib_order, calib_resize)):
        preprocess = parse_preprocess(calib_size, calib_mean, calib_std, calib_layout, calib_order, calib_resize)
    result = compile_model(model, target, out_dir, prune=prune, prune_mode=prune_mode, calib=calib,
                           calib_method=calib_method, calib_samples=calib_samples, preprocess=preprocess,
                           pipeline=pipeline, exclude=exclude or [], max_drop=max_drop, dump_ir=dump_ir,
                           verify=verify, force=force, input_shapes=parse_input_shapes(input_shape or []),
                           show_progress=wants_progress(json_out))
    if json_out:
        typer.echo(json.dumps(result.summary(), indent=2, default=str))
        return
    err = Console(stderr=True, highlight=False)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}")
    t = result.descriptor["totals"]
    out.print(f"pipeline: {result.pipeline}")
    if timing:
        table = Table("#", "pass", "changed", "seconds")
        for i, r in enumerate(result.records, 1):
            table.add_row(str(i), r.name, "yes" if r.changed else "-", f"{r.seconds:.3f}")
            for phase, seconds in r.phases.items():
                table.add_row("", f"  {phase}", "", f"{seconds:.3f}")
        out.print(table)
    prune_facts = next((r.facts for r in result.records if r.name == "prune" and r.changed), None)
    pruned = prune_facts is not None
    out.print(f"layers: {t['layers_on_drpai']} on DRP-AI, {t['layers_on_cpu']} on CPU; "
              f"{_count('MACs', t, 'macs', pruned)}; {_count('params', t, 'params', pruned)}")
    if pruned:
        out.print(_pruning_line(prune_facts, result.descriptor["layers"]))
    out.print(f"memory: {t['memory_bytes'] / 2**20:.2f} MiB (activations {t['activation_bytes'] / 2**20:.2f} MiB, "
              f"{t['activation_bytes_no_reuse'] / 2**20:.2f} MiB without reuse); "
              f"estimated latency {t['estimated_latency_ms']:.3f} ms")
    out.print(f"package: {result.out_dir}")


def _count(label: str, totals: dict, key: str, pruned: bool) -> str:
    """'MACs 5,791,744', or after pruning 'MACs 5,791,744 → 2,247,336 non-zero (-61.2%)' (before → after)."""
    if not pruned:
        return f"{label} {totals[key]:,}"
    return f"{label} {before_after(totals, key, ' non-zero')}"


def _pruning_line(facts: dict, layers: list[dict]) -> str:
    """'pruning: 70.0% of 29,744 prunable weights removed (sparse); kept dense: 'conv0', 'fc'' (the stem and
    classifier are outside the ratio, which is why the model's params fall by less than --prune), each layer
    followed by its PyTorch module when the exporter recorded one; channel mode adds '; attention heads 16 → 9'
    when it could prune heads, and how many LayerNorms and channel means it refit when their streams narrowed; a
    layer kept dense that lost the channels of the stream it writes (a ViT's patch embedding) says so."""
    how = facts["mode"] + (f", {len(facts['steps'])} steps" if len(facts.get("steps", [])) > 1 else "")
    line = (f"pruning: {facts['achieved_ratio']:.1%} of {facts['prunable_weights']:,} prunable weights removed "
            f"({how})")
    if facts.get("attention_heads"):
        line += "; attention heads {:,} → {:,}".format(*facts["attention_heads"])
    if facts.get("statistics_refit"):
        line += f"; {facts['statistics_refit']} LayerNorms and channel means refit to the kept channels"
    if facts.get("kept_dense"):
        by_name = {layer["name"]: layer for layer in layers}

        def dense(name: str) -> str:
            layer = by_name.get(name, {})
            notes = [layer["pytorch_module"]] if layer.get("pytorch_module") else []
            if "channels_after" in layer:  # a stem that lost the channels of the stream it writes
                notes.append(f"channels {layer['channels_before']} → {layer['channels_after']} with its stream")
            return f"'{name}'" + (f" ({'; '.join(notes)})" if notes else "")
        line += "; kept dense: " + ", ".join(dense(name) for name in facts["kept_dense"])
    return line


@app.command("simulate")
def simulate_cmd(
    package: Path = typer.Argument(..., help="Package folder written by `drpc compile`."),
    data: Optional[Path] = typer.Option(None, "--data", help="Inputs to run (.npy/.npz/images); default: the package's samples."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Fail when an output's cosine similarity is lower."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Validate a package: structure, schema, tensors, placement, memory, then outputs vs the reference."""
    from backends.simulator import simulate

    report = simulate(package, data, min_cosine)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for name, problems in report.checks.items():
            out.print(f"{'ok  ' if not problems else 'FAIL'} {name}")
        table = Table("output", "cosine", "max abs err", "mean abs err", "correct ratio", "top-1 agree")
        for name, m in report.outputs.items():
            table.add_row(name, _f(m.get("cosine")), _f(m.get("max_abs_error")), _f(m.get("mean_abs_error")),
                          _f(m.get("correct_ratio")), _f(m.get("top1_agreement")))
        out.print(table)
        out.print(f"{report.samples} samples; package {'OK' if report.ok else 'REFUSED'}")
    if not report.ok:
        for line in report.problems():
            typer.echo(f"drpc: {line}", err=True)
        raise typer.Exit(1)


FORM_NOTES = {
    "float16": "compile computes in float32 behind the same interface (widen-float16), then quantizes for "
               "the target",
    "quantized (QDQ)": "compile takes it back to the float model it simulates (strip-quantization), then prunes "
                       "and calibrates it anew for the target",
    "quantized (operator form)": "compile refuses it; give it the float model",
}


def model_form(proto) -> str:
    """How `proto`'s numbers are held: "float32", "float16" (fp16/bf16 weights or interface), "quantized (QDQ)"
    or "quantized (operator form)"."""
    import onnx

    from passes.strip_quantization import operator_form
    from passes.widen_float16 import HALF

    ops = {n.op_type for n in proto.graph.node}
    if any(operator_form(op) for op in ops):
        return "quantized (operator form)"
    if "DequantizeLinear" in ops:
        return "quantized (QDQ)"
    interface = [v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]]
    weights = [t.data_type for t in proto.graph.initializer]
    if HALF & {*interface, *weights} or any(n.op_type == "Cast" and onnx.helper.get_attribute_value(a) in HALF
                                            for n in proto.graph.node for a in n.attribute if a.name == "to"):
        return "float16"
    return "float32"


def _as_compiled(proto, target):
    """`proto` after `target`'s lossless passes (folding, cleanup, fusions; a QDQ model back to float), which
    compile runs before placing layers; None when they do not apply to it."""
    from itertools import takewhile

    from compiler.context import CompileContext
    from compiler.ir import Module
    from compiler.passmanager import PassManager
    from compiler.pipeline import parse_pipeline

    passes = parse_pipeline(target.default_pipeline).passes
    module = Module.from_proto(proto)
    try:
        PassManager(list(takewhile(lambda p: p.lossless or p.makes_float_source, passes))).run(
            module, CompileContext(target=target))
    except DrpcError:
        return None
    return module.to_proto(infer_shapes=True)


@app.command("inspect")
def inspect_cmd(
    model: Path = typer.Argument(..., help="ONNX model to describe."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Also show what runs where on this target."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Describe a model: inputs, outputs, ops, parameters, MACs, and placement on a target."""
    from backends.cost_model import count_macs, count_params
    from compiler.ir import Module

    module = Module.load(model)
    proto = module.to_proto(infer_shapes=True)
    macs, params = count_macs(proto), count_params(proto)
    info = {
        "model": str(model), "opset": module.opset, "producer": module.producer_name,
        "inputs": [{"name": t.name, "shape": list(t.shape or []), "dtype": str(t.dtype)} for t in module.graph.inputs],
        "outputs": [{"name": t.name, "shape": list(t.shape or []), "dtype": str(t.dtype)} for t in module.graph.outputs],
        "nodes": len(proto.graph.node), "ops": dict(Counter(n.op_type for n in proto.graph.node).most_common()),
        "params": int(sum(params.values())), "macs": int(sum(macs.values())),
        "form": model_form(proto),
    }
    if target:
        from backends.partition import QDQ, partition
        from compiler.target import load_target

        tgt = load_target(target)
        placed = _as_compiled(proto, tgt) or proto
        part = partition(placed, tgt)
        layers = [part.engine_of[n.name] for n in placed.graph.node if n.op_type not in QDQ]
        info["placement"] = {"target": target, "drpai": layers.count("drpai"), "cpu": layers.count("cpu"),
                             "cpu_nodes": part.reasons, "subgraphs": len(part.subgraphs)}
    if json_out:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    out.print(f"{model}: opset {info['opset']}, {info['nodes']} nodes, {info['params']:,} params, {info['macs']:,} MACs")
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            out.print(f"  {kind[:-1]} {t['name']} {t['dtype']} {t['shape']}")
    out.print("  ops: " + ", ".join(f"{k}×{v}" for k, v in info["ops"].items()))
    if info["form"] in FORM_NOTES:
        out.print(f"  form: {info['form']}: {FORM_NOTES[info['form']]}")
    if target:
        p = info["placement"]
        out.print(f"  on {target}: {p['drpai']} layers on DRP-AI, {p['cpu']} on CPU, {p['subgraphs']} subgraphs")
        for name, reason in p["cpu_nodes"].items():
            out.print(f"    cpu  {name}: {reason}")


@app.command("passes")
def passes_cmd() -> None:
    """List every registered pass, one line each."""
    from compiler.passmanager import registered_passes

    for name, cls in registered_passes().items():
        opts = ", ".join(f"{k}={v.default}" for k, v in cls.OPTIONS.items())
        kind = "lossless" if cls.lossless else "lossy"
        typer.echo(f"{name:22s} {kind:8s} {cls.summary()}" + (f"  [{opts}]" if opts else ""))


@app.command("targets")
def targets_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List every target and its key facts."""
    from compiler.target import list_targets

    targets = list_targets()
    if json_out:
        typer.echo(json.dumps([t.to_summary() for t in targets], indent=2, default=str))
        return
    table = Table("target", "accelerator", "precision", "memory", "prune mode", "description")
    for t in targets:
        s = t.to_summary()
        mem = s.get("memory", {})
        table.add_row(t.name, str(s.get("accelerator")), str(s.get("precision")),
                      f"{mem.get('size', 0) / 2**20:.0f} MiB @ {hex(mem.get('base', 0))}",
                      str(s.get("default_prune_mode")), str(s.get("description", ""))[:60])
    out.print(table)


def _f(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning drpc errors into one line and an exit code (traceback with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        result = app(args=args, prog_name="drpc", standalone_mode=False)
        code = result if isinstance(result, int) else 0  # typer returns an Exit's code here
        if code == 130:  # typer turns Ctrl-C into Exit(130)
            typer.echo("drpc: interrupted; no package was written", err=True)
        return code
    except DrpcError as exc:
        if debug:
            raise
        typer.echo(f"drpc: error: {exc}", err=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("drpc: interrupted; no package was written", err=True)
        return 130
    except Exception as exc:
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # typer's usage errors
            exc.show()
            return exc.exit_code
        if debug:  # a bug in drpc: still one line unless --debug
            raise
        typer.echo(f"drpc: internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)", err=True)
        return 1


def entry() -> None:
    """Console-script wrapper around `main`."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
