"""Emit a deployment package for a target: model, reference, deploy.json, addr_map.txt, report, samples."""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from backends.cost_model import count_macs, count_params, estimate, holds_weights
from backends.deploy_schema import SCHEMA_FILE, SCHEMA_PATH, SCHEMA_VERSION, validate_descriptor
from backends.memory_plan import plan_memory
from backends.package import staged_directory, write_arrays, write_json
from backends.partition import partition
from backends.report_html import render_report
from backends.qdq_info import activation_quant_params, initializer_values, weight_quant_params
from compiler.ir import save_proto
from compiler.runtime import run_model
from compiler.sparsity import reduction_axis, skippable_zeros

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
SAMPLE_BYTES = 64 << 20  # sample inputs shipped in a package for device-side checks


@dataclass
class PackageInputs:
    """Everything the backend needs besides the model itself."""

    model: onnx.ModelProto          # final model, shapes inferred
    reference: onnx.ModelProto      # float model after the lossless passes
    target: object
    ctx: object                     # CompileContext (records, layers, warnings, calib)
    source_path: Path
    pipeline: str
    drpc_version: str


def build_descriptor(inp: PackageInputs) -> tuple[dict, list[str], dict]:
    """deploy.json content, the addr_map.txt lines and the cost report for `inp.model` on its target."""
    model, target, ctx = inp.model, inp.target, inp.ctx
    part = partition(model, target)
    plan = plan_memory(model, target, part)
    zeros = weight_zeros(model, int(target.sparsity.get("group_size", 1)))
    sparsity = {name: z / max(size, 1) for name, (z, size) in zeros.items()}
    cost = estimate(model, target, part, sparsity)
    macs, params = count_macs(model), count_params(model)
    macs_before, params_before = count_macs(inp.reference), count_params(inp.reference)
    act_q, w_q = activation_quant_params(model), weight_quant_params(model)
    plan_dict = plan.to_dict()
    tensor_addr = {t["name"]: t for t in plan_dict["tensors"]}
    cost_dict = cost.to_dict()
    cost_layers = {c["name"]: c for c in cost_dict.get("layers", [])}
    dq_of = {info["dequantized"]: name for name, info in w_q.items()}

    layers = []
    for node in model.graph.node:
        if node.op_type in QDQ_OPS or node.op_type == "Constant":
            continue
        weights = [dq_of.get(i, i) for i in node.input[1:] if dq_of.get(i, i) in tensor_addr
                   and tensor_addr[dq_of.get(i, i)]["region"] == "weight"]
        w0 = tensor_addr.get(weights[0]) if weights else None
        entry = {
            "name": node.name, "op": node.op_type, "engine": part.engine_of.get(node.name, "cpu"),
            "inputs": list(node.input), "outputs": list(node.output),
            "macs": int(macs.get(node.name, 0)), "params": int(params.get(node.name, 0)),
            "weight_sparsity": float(sparsity.get(node.name, 0.0)),
            "nonzero_macs": round(macs.get(node.name, 0) * (1.0 - sparsity.get(node.name, 0.0))),
            "nonzero_params": int(params.get(node.name, 0)) - zeros.get(node.name, (0, 0))[0],
            "weight_offset": w0["offset"] if w0 else None, "weight_size": sum(tensor_addr[w]["size"] for w in weights),
            "quantized": any(i in dq_of or i in act_q for i in node.input),
            "latency_us": cost_layers.get(node.name, {}).get("latency_us"),
        }
        if node.name in macs_before or node.name in params_before:  # before pruning (the float model after
            entry["macs_before"] = int(macs_before.get(node.name, 0))  # the lossless passes)
            entry["params_before"] = int(params_before.get(node.name, 0))
        if node.name in part.reasons:
            entry["cpu_reason"] = part.reasons[node.name]
        entry.update({k: v for k, v in ctx.layers.get(node.name, {}).items() if k not in entry})
        layers.append(entry)

    tensors = []
    for t in plan_dict["tensors"]:
        entry = dict(t)
        q = act_q.get(t["name"]) or w_q.get(t["name"])
        entry["scale"] = q["scale"] if q else None
        entry["zero_point"] = q["zero_point"] if q else None
        tensors.append(entry)

    io = {t.name: t for t in list(model.graph.input) + list(model.graph.output)}
    calib = ctx.calib.summary() if ctx.calib is not None else {"synthetic": True}
    descriptor = {
        "schema": "drpc-deploy",
        "schema_version": SCHEMA_VERSION,
        "target": target.to_summary(),
        "toolchain": {"name": "drpc", "version": inp.drpc_version, "onnx": onnx.__version__},
        "provenance": {
            "model_path": str(inp.source_path),
            "model_sha256": sha256_file(inp.source_path),
            "pipeline": inp.pipeline,
            "calibration": calib,
            "accuracy_measured": not calib.get("synthetic", True),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "inputs": [_io_entry(io[i.name], act_q, ctx, "input") for i in model.graph.input
                   if i.name not in initializer_values(model)],
        "outputs": [_io_entry(io[o.name], act_q, ctx, "output") for o in model.graph.output],
        "subgraphs": part.to_dict()["subgraphs"],
        "transfers": part.to_dict().get("transfers", []),
        "layers": layers,
        "tensors": tensors,
        "memory": {k: v for k, v in plan_dict.items() if k != "tensors"},
        "totals": {
            "memory_bytes": plan_dict["total"],
            "activation_bytes": plan_dict["activation_peak"],
            "activation_bytes_no_reuse": plan_dict["activation_no_reuse"],
            "weight_bytes": sum(t["size"] for t in plan_dict["tensors"] if t["region"] == "weight"),
            "macs": int(sum(macs.values())),
            "params": int(sum(params.values())),
            "nonzero_macs": sum(l["nonzero_macs"] for l in layers),
            "nonzero_params": sum(l["nonzero_params"] for l in layers),
            "macs_before": int(sum(macs_before.values())),
            "params_before": int(sum(params_before.values())),
            "estimated_latency_ms": cost_dict.get("total_latency_ms"),
            "layers_on_drpai": sum(1 for l in layers if l["engine"] == "drpai"),
            "layers_on_cpu": sum(1 for l in layers if l["engine"] == "cpu"),
        },
        "cost_model": {"assumptions": cost_dict.get("assumptions", [])},
        "warnings": list(ctx.warnings),
    }
    validate_descriptor(descriptor)
    return descriptor, plan.addr_map_lines(), cost_dict


def emit_package(inp: PackageInputs, out_dir: Path, force: bool) -> dict:
    """Write the whole package atomically to `out_dir`; returns the descriptor."""
    descriptor, addr_lines, cost = build_descriptor(inp)
    with staged_directory(out_dir, force) as tmp:
        save_proto(inp.model, tmp / "model.onnx")
        save_proto(inp.reference, tmp / "reference.onnx")
        write_json(tmp / "deploy.json", descriptor)
        shutil.copyfile(SCHEMA_PATH, tmp / SCHEMA_FILE)  # the package documents its own descriptor format
        (tmp / "addr_map.txt").write_text("\n".join(addr_lines) + "\n")
        samples = inp.ctx.sample_inputs(4)
        if samples is not None and sum(a.nbytes for a in samples.values()) > SAMPLE_BYTES:
            samples = inp.ctx.sample_inputs(1)
        if samples is not None and sum(a.nbytes for a in samples.values()) <= SAMPLE_BYTES:
            write_arrays(tmp / "sample_inputs.npz", samples)
            names = [o.name for o in inp.reference.graph.output]
            write_arrays(tmp / "reference_outputs.npz", dict(zip(names, run_model(inp.reference, samples))))
        report = build_report(inp, descriptor, cost)
        write_json(tmp / "report.json", report)
        (tmp / "report.html").write_text(render_report(descriptor, report))
    return descriptor


def build_report(inp: PackageInputs, descriptor: dict, cost: dict) -> dict:
    """report.json: what each pass did, per-layer facts, placement and memory totals."""
    ctx = inp.ctx
    return {
        "pipeline": inp.pipeline,
        "passes": [{"name": r.name, "changed": r.changed, "seconds": round(r.seconds, 4),
                    **({"phase_seconds": {k: round(v, 4) for k, v in r.phases.items()}} if r.phases else {}),
                    **r.facts} for r in ctx.records],
        "warnings": list(ctx.warnings),
        "layers": descriptor["layers"],
        "placement": {"subgraphs": descriptor["subgraphs"], "transfers": descriptor["transfers"]},
        "memory": descriptor["memory"],
        "totals": descriptor["totals"],
        "cost": cost,
        "calibration": descriptor["provenance"]["calibration"],
    }


def weight_zeros(model: onnx.ModelProto, group_size: int = 1) -> dict[str, tuple[int, int]]:
    """(zero weights the accelerator can skip (see compiler.sparsity), weight elements) of every node with a
    weight (the first constant input after the data); their ratio is deploy.json's weight_sparsity."""
    consts = initializer_values(model)
    dq_source = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for node in model.graph.node:
        if node.op_type in QDQ_OPS or len(node.input) < 2:
            continue
        name = dq_source.get(node.input[1], node.input[1])
        w = consts.get(name)
        if w is not None and w.ndim >= 2 and holds_weights(w, dequantized=name != node.input[1]):
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = reduction_axis(node.op_type, w.ndim, trans_b)
            zeros = skippable_zeros(w, axis, group_size) if axis is not None else int(np.count_nonzero(w == 0))
            out[node.name] = (int(zeros), int(w.size))
    return out


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _io_entry(value_info, act_q, ctx, kind) -> dict:
    tt = value_info.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    entry = {"name": value_info.name, "shape": shape,
             "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else None,
             "quantization": act_q.get(value_info.name)}
    if kind == "input":
        entry["preprocessing"] = ctx.options.get("preprocessing", {}).get(value_info.name)
    return entry

