"""fuse-conv-bn: fold an inference BatchNormalization into the Conv/ConvTranspose before it."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Pass, register_pass
from compiler.rewrite import bypass, const_value, fresh_name, set_input, sole_consumer


@register_pass
class FuseConvBatchNorm(Pass):
    """Fold BatchNormalization(Conv(x, W, b)) into Conv(x, W', b') when the Conv output feeds only the BN.

    W' = W * s per output channel and b' = (b - mean) * s + beta, with s = gamma / sqrt(var + eps),
    computed in float64. Guarantees: outputs unchanged up to float rounding; BNs in training mode, with
    non-constant parameters or a shared Conv output are left alone.
    """

    name = "fuse-conv-bn"
    lossless = True

    def run(self, module, ctx) -> bool:
        graph = module.graph
        fused = 0
        for bn in list(graph.nodes):
            affine = inference_batchnorm(bn)
            if affine is None:
                continue
            conv = bn.inputs[0].inputs[0] if bn.inputs[0].inputs else None
            if conv is None or conv.op not in ("Conv", "ConvTranspose") or sole_consumer(graph, bn.inputs[0]) is not bn:
                continue
            weight = const_value(conv.inputs[1])
            bias = const_value(conv.inputs[2]) if len(conv.inputs) > 2 else None
            if weight is None or (len(conv.inputs) > 2 and bias is None):
                continue
            scale, mean, beta = affine
            out_channels = weight.shape[0] if conv.op == "Conv" else weight.shape[1] * conv.attrs.get("group", 1)
            if scale.shape != (out_channels,):
                continue
            new_w = _scale_output_channels(weight.astype(np.float64), scale, conv)
            b = np.zeros(out_channels) if bias is None else bias.astype(np.float64)
            new_b = (b - mean) * scale + beta
            dtype = weight.dtype
            conv.inputs[1] = gs.Constant(fresh_name(graph, conv.name + "_W"), new_w.astype(dtype))
            set_input(conv, 2, gs.Constant(fresh_name(graph, conv.name + "_B"), new_b.astype(dtype)))
            if bypass(graph, bn, conv.outputs[0], bn.outputs[0]):
                fused += 1
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False)
        if ctx is not None:
            ctx.log(fused=fused)
        return fused > 0


def inference_batchnorm(bn: gs.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(scale, mean, beta) in float64 of a BatchNormalization in inference mode with constant parameters, which
    computes y = (x - mean) * scale + beta per channel; None for any other node."""
    if bn.op != "BatchNormalization" or bn.attrs.get("training_mode", 0) or len(bn.outputs) != 1:
        return None
    params = [const_value(t) for t in bn.inputs[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    return gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5))), mean, beta


def _scale_output_channels(weight: np.ndarray, scale: np.ndarray, conv: gs.Node) -> np.ndarray:
    if conv.op == "Conv":
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    # ConvTranspose weight: [C_in, C_out / group, k...]; output channel o = g * (C_out/group) + j
    group = conv.attrs.get("group", 1)
    c_in, c_out_g = weight.shape[:2]
    w = weight.reshape((group, c_in // group, c_out_g) + weight.shape[2:])
    s = scale.reshape((group, 1, c_out_g) + (1,) * (weight.ndim - 2))
    return (w * s).reshape(weight.shape)
