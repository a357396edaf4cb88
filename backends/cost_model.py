"""Cost model: MACs and parameters per layer, and an estimated latency on the target.

Assumptions (also written to every report):
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from backends.graph_view import GraphView

ASSUMPTIONS = [
    "DRP-AI runs MAC-bound layers at dense_tops x efficiency (2 ops per MAC)",
    "weight sparsity speeds a DRP-AI3 layer up by 1/(1 - sparsity), capped at the target's max_speedup",
    "element-wise and data-movement layers cost one op per output element on their engine",
    "CPU layers run at the CPU's gflops figure (all cores, 2 ops per MAC)",
    "each transfer between engines costs a fixed overhead plus bytes / DMA bandwidth",
    "the figures are estimates for comparison between compiles, not measurements on a board",
]
__doc__ += "\n".join(f"- {a}" for a in ASSUMPTIONS)

QDQ = {"QuantizeLinear", "DequantizeLinear"}


@dataclass
class CostReport:
    """Per-layer latency estimates and totals, with the assumptions behind them."""

    layers: list[dict] = field(default_factory=list)
    transfer_us: float = 0.0
    total_latency_ms: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"layers": self.layers, "transfer_us": self.transfer_us, "total_latency_ms": self.total_latency_ms,
                "assumptions": ASSUMPTIONS}


def count_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates of every Conv, ConvTranspose, Gemm and MatMul node (batch 1 for symbolic batch)."""
    view = GraphView(model)
    macs = {}
    for node in view.nodes:
        out = view.shape(node.output[0]) if node.output else None
        w = view.shape(node.input[1]) if len(node.input) > 1 else None
        if out is None or w is None or any(not isinstance(d, int) for d in out[1:]):
            continue
        if any(not isinstance(d, int) for d in (w[-2:] if node.op_type == "MatMul" else w)):  # a MatMul's B may
            continue                                                                           # carry the batch
        out_elems = int(np.prod([d if isinstance(d, int) else 1 for d in out], dtype=np.int64))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            macs[node.name] = out_elems * int(np.prod(w[1:], dtype=np.int64))
        elif node.op_type == "ConvTranspose":
            x = view.shape(node.input[0])
            if x and all(isinstance(d, int) for d in x[1:]):  # every input element meets Cout/group x kernel weights
                macs[node.name] = int(np.prod(x[1:], dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        elif node.op_type == "Gemm":
            k = w[0] if not attrs.get("transB", 0) else w[1]
            macs[node.name] = out_elems * k
        elif node.op_type == "MatMul":
            macs[node.name] = out_elems * (w[-2] if len(w) >= 2 else w[0])
    return macs


def count_params(model: onnx.ModelProto) -> dict[str, int]:
    """Stored weight elements read by each non-QDQ node: floating-point constants and the integers behind a
    DequantizeLinear (quantized weights and biases); integer constants read as they are (Reshape targets,
    Slice bounds, Pad sizes) are shape data, not parameters."""
    view = GraphView(model)
    params = {}
    for node in view.nodes:
        if node.op_type in QDQ:
            continue
        total = sum(view.consts[view.const_source(i)].size for i in node.input[1:]
                    if i and view.is_const(i) and _is_parameter(view, i))
        if total:
            params[node.name] = int(total)
    return params


def _is_parameter(view: GraphView, name: str) -> bool:
    """Whether the constant input `name` holds weights (see count_params)."""
    source = view.const_source(name)
    return view.consts[source].ndim >= 1 and holds_weights(view.consts[source], dequantized=source != name)


def holds_weights(value: np.ndarray, dequantized: bool) -> bool:
    """Whether a constant a node reads holds weights rather than shape data: floating point, or integers read
    through a DequantizeLinear."""
    return dequantized or np.issubdtype(value.dtype, np.floating)


def estimate(model: onnx.ModelProto, target, partition, sparsity: dict[str, float] | None = None) -> CostReport:
    """Latency per layer on its engine plus transfers, under ASSUMPTIONS."""
    view = GraphView(model)
    macs = count_macs(model)
    sparsity = sparsity or {}
    drpai_ops_per_s = target.dense_tops * 1e12 * target.efficiency
    cpu_ops_per_s = float(target.cpu["gflops"]) * 1e9
    report = CostReport()
    total_us = 0.0
    for node in view.nodes:
        if node.op_type in QDQ or node.op_type == "Constant":
            continue
        engine = partition.engine_of.get(node.name, "cpu")
        ops = 2.0 * macs.get(node.name, 0)
        if not ops:
            ops = float(sum(view.nbytes(o) or 0 for o in node.output if o)) / 4.0
        if engine == "drpai":
            speedup = 1.0
            s = sparsity.get(node.name, 0.0)
            if target.sparsity.get("supported") and s > 0:
                speedup = min(1.0 / max(1.0 - s, 1e-6), float(target.sparsity.get("max_speedup", 1.0)))
            us = ops / drpai_ops_per_s / speedup * 1e6
        else:
            us = ops / cpu_ops_per_s * 1e6
        total_us += us
        report.layers.append({"name": node.name, "engine": engine, "macs": macs.get(node.name, 0),
                              "latency_us": round(us, 3)})
    for tensor, _, _ in partition.transfers:
        report.transfer_us += target.transfer_overhead_us + (view.nbytes(tensor) or 0) / (target.dma_gbps * 1e9) * 1e6
    report.total_latency_ms = (total_us + report.transfer_us) / 1000.0
    return report
