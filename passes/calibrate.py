"""calibrate: set every activation Q/DQ pair's scale and zero point from calibration data; int32 biases."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from compiler.activations import stream_activations
from compiler.observers import TensorObserver, choose_range, quant_params, sqnr_db
from compiler.passmanager import Option, Pass, register_pass
from compiler.rewrite import const_value, fresh_name
from passes.quant_common import SHARED_SCALE_OPS, activation_qdq_pairs, set_qparams

METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
BATCH_BYTES = 32 << 20  # activations held per calibration batch
INT32_MAX = 2**31 - 1


@register_pass
class Calibrate(Pass):
    """Measure each quantized activation on the calibration data and set its uint8 scale and zero point.

    Guarantees: one onnxruntime session over the float activations (Q/DQ bypassed), streamed batch by batch
    with a fixed-size histogram per tensor, so memory does not grow with the number of samples; ranges by
    `method`; data-movement ops share their input's parameters and Concat inputs share the output's; biases
    of quantized Conv/Gemm become int32 with scale = input scale x weight scale; where a bias would overflow
    int32 (a dead channel: weights near 0, so a weight scale near 0, beside a real bias) that channel's weight
    scale is raised until it fits and its int8 weights re-rounded, which moves its output by at most
    d x 1.2e-7 of the bias (d weights per output; each moves by half a step of at most |b| / (s_x 2^30)); a
    bias that still cannot be made int32 keeps its float value and is reported; per-tensor SQNR goes to the
    per-layer report.
    """

    name = "calibrate"
    OPTIONS = {"method": Option(str, "minmax", "range method", choices=METHODS),
               "bins": Option(int, 2048, "histogram bins", minimum=64)}

    def run(self, module, ctx) -> bool:
        graph = module.graph
        pairs = activation_qdq_pairs(graph)
        if not pairs:
            return False
        if ctx is None or ctx.calib is None:
            raise ValueError("calibrate needs calibration data in the context")
        observers = self._observe(module, pairs, ctx)
        params = {}
        for q, dq in pairs:
            obs = observers[q.inputs[0].name]
            lo, hi = choose_range(obs, self.method)
            params[q.name] = (lo, hi)
        self._share_ranges(graph, pairs, params)
        for q, dq in pairs:
            lo, hi = params[q.name]
            scale, zp = quant_params(lo, hi)
            set_qparams(graph, q, dq, scale, zp)
            producer = q.inputs[0].inputs[0].name if q.inputs[0].inputs else q.inputs[0].name
            ctx.layer(producer, quant_scale=scale, quant_zero_point=zp,
                      quant_sqnr_db=round(float(min(sqnr_db(observers[q.inputs[0].name], lo, hi), 99.0)), 2))
        overflow, raised = self._int32_biases(graph)
        ctx.log(method=self.method, tensors=len(pairs), samples=ctx.calib.num_samples,
                synthetic_data=ctx.calib.synthetic, bias_overflow=overflow, weight_scale_raised_for_bias=raised)
        if overflow:
            ctx.warn(f"bias of {', '.join(overflow)} does not fit int32 at its scale; kept in float")
        return True

    def _observe(self, module, pairs, ctx) -> dict[str, TensorObserver]:
        proto = module.to_proto(infer_shapes=True)
        bypass = {dq.outputs[0].name: q.inputs[0].name for q, dq in pairs}
        for node in proto.graph.node:
            for i, name in enumerate(node.input):
                if name in bypass:
                    node.input[i] = bypass[name]
        names = sorted({q.inputs[0].name for q, _ in pairs})
        observers = {n: TensorObserver(bins=self.bins) for n in names}
        batch = _batch_size(proto, names)
        passes = [("ranges", lambda o, x: o.observe_range(x)),  # histograms also give the per-layer SQNR
                  ("histograms", lambda o, x: o.observe_hist(x))]
        for label, update in passes:
            with ctx.progress(f"Calibrating ({label})", ctx.calib.num_samples) as advance:
                for values in stream_activations(proto, names, ctx.calib, batch_size=batch, progress=advance):
                    for name, value in values.items():
                        update(observers[name], np.asarray(value, dtype=np.float32))
        return observers

    @staticmethod
    def _share_ranges(graph: gs.Graph, pairs, params) -> None:
        q_of_tensor = {q.inputs[0].name: q for q, _ in pairs}
        dq_source = {dq.outputs[0].name: q for q, dq in pairs}
        for node in graph.nodes:  # topological: chains of data movement inherit from the first input
            if node.op in SHARED_SCALE_OPS and node.inputs and node.inputs[0].name in dq_source:
                src = dq_source[node.inputs[0].name]
                for out in node.outputs:
                    target = _range_owner(out, q_of_tensor)
                    if target is not None:
                        params[target.name] = params[src.name]
            elif node.op == "Concat":
                members = [dq_source[t.name] for t in node.inputs if t.name in dq_source]
                out_q = _range_owner(node.outputs[0], q_of_tensor)
                members += [out_q] if out_q is not None else []
                if len(members) > 1:
                    lo = min(params[m.name][0] for m in members)
                    hi = max(params[m.name][1] for m in members)
                    for m in members:
                        params[m.name] = (lo, hi)

    @staticmethod
    def _int32_biases(graph: gs.Graph) -> tuple[list[str], list[str]]:
        """Make quantized Conv/Gemm biases int32 (see the class docstring): the layers whose bias stays float, and
        those whose weight scale was raised so that it fits."""
        overflow, raised = [], []
        for node in list(graph.nodes):
            if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3:
                continue
            x, w, b = node.inputs[0], node.inputs[1], node.inputs[2]
            bias = const_value(b) if isinstance(b, gs.Constant) else None
            x_dq = x.inputs[0] if x.inputs and x.inputs[0].op == "DequantizeLinear" else None
            w_dq = w.inputs[0] if w.inputs and w.inputs[0].op == "DequantizeLinear" else None
            if bias is None or x_dq is None or w_dq is None or bias.dtype.kind != "f":
                continue
            if node.op == "Gemm" and bias.ndim == 2 and bias.shape[0] == 1:
                bias = bias.reshape(-1)  # C of shape [1, N] broadcasts over the rows exactly as [N]
            if node.op == "Gemm" and (node.attrs.get("beta", 1.0) != 1.0 or bias.ndim != 1):
                continue
            s_x = float(np.asarray(x_dq.inputs[1].values).reshape(-1)[0])
            s_w = np.asarray(w_dq.inputs[1].values, dtype=np.float64).reshape(-1)
            s_b = (s_x * s_w).astype(np.float32)
            if s_b.size != bias.size:
                s_b = np.broadcast_to(s_b, bias.shape).astype(np.float32)
            q = np.round(bias.astype(np.float64) / s_b.astype(np.float64))
            if np.abs(q).max(initial=0) > INT32_MAX:
                s_b = _fit_weight_scale(graph, w_dq, bias, s_x)
                if s_b is None:
                    overflow.append(node.name)
                    continue
                raised.append(node.name)
                q = np.round(bias.astype(np.float64) / s_b.astype(np.float64))
            q_c = gs.Constant(fresh_name(graph, b.name + "_int32"), q.astype(np.int32))
            s_c = gs.Constant(fresh_name(graph, b.name + "_bscale"), s_b)
            z_c = gs.Constant(fresh_name(graph, b.name + "_bzero"), np.zeros(s_b.shape, np.int32))
            out = gs.Variable(fresh_name(graph, b.name + "_dequantized"), dtype=np.float32, shape=list(bias.shape))
            graph.nodes.append(gs.Node("DequantizeLinear", fresh_name(graph, node.name + "_bias_DequantizeLinear"),
                                       attrs={"axis": 0}, inputs=[q_c, s_c, z_c], outputs=[out]))
            node.inputs[2] = out
        graph.toposort()
        return overflow, raised


def _fit_weight_scale(graph: gs.Graph, w_dq: gs.Node, bias: np.ndarray, s_x: float) -> np.ndarray | None:
    """Raise the weight scales of `w_dq` (per output channel, symmetric) just enough that `bias` fits int32 at
    input scale `s_x` (to 2^30, leaving room for float32 rounding of the product), re-rounding the int8 weights
    to the new scales; the new bias scales, or None when the weight's layout does not allow it."""
    q_w = np.asarray(w_dq.inputs[0].values)
    s_w = np.asarray(w_dq.inputs[1].values, dtype=np.float64)
    zero = w_dq.inputs[2] if len(w_dq.inputs) > 2 else None
    if zero is not None and np.any(np.asarray(zero.values) != 0):
        return None
    if s_w.ndim > 1 or s_w.size not in (1, bias.size) or q_w.dtype != np.int8:
        return None
    needed = np.abs(bias.astype(np.float64)) / (s_x * 2.0**30)
    new = np.maximum(s_w, needed.max() if s_w.size == 1 else needed)
    shape = [1] * q_w.ndim
    shape[w_dq.attrs.get("axis", 1)] = -1  # one scale: all ones
    requantized = np.round(q_w * (s_w / new).reshape(shape)).astype(np.int8)  # |q| only shrinks: new >= old
    w_dq.inputs[0] = gs.Constant(fresh_name(graph, w_dq.inputs[0].name + "_rescaled"), requantized)
    w_dq.inputs[1] = gs.Constant(fresh_name(graph, w_dq.inputs[1].name + "_rescaled"), new.astype(np.float32))
    return np.broadcast_to((s_x * new).astype(np.float32), bias.shape).astype(np.float32)


def _range_owner(tensor: gs.Tensor, q_of_tensor: dict):
    """The Q node that quantizes `tensor` (directly, or after an absorbed Relu/Clip)."""
    if tensor.name in q_of_tensor:
        return q_of_tensor[tensor.name]
    readers = tensor.outputs
    if len(readers) == 1 and readers[0].op in ("Relu", "Clip") and readers[0].outputs[0].name in q_of_tensor:
        return q_of_tensor[readers[0].outputs[0].name]
    return None


def _batch_size(proto: onnx.ModelProto, names: list[str]) -> int:
    """Samples per calibration batch so that the observed activations of one batch stay under BATCH_BYTES."""
    sizes = {}
    for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim[1:]]
        sizes[vi.name] = int(np.prod(dims, dtype=np.int64)) * 4
    per_sample = sum(sizes.get(n, 1 << 20) for n in names)
    return int(np.clip(BATCH_BYTES // max(per_sample, 1), 1, 32))
