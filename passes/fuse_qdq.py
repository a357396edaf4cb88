"""fuse-qdq: clean up Q/DQ nodes so that only useful quantization boundaries remain."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Pass, register_pass
from compiler.rewrite import is_graph_output, replace_uses
from passes.quant_common import COMPUTE_OPS, SHARED_SCALE_OPS, activation_qdq_pairs

QUANTIZED_NEIGHBOURS = COMPUTE_OPS | SHARED_SCALE_OPS | {"Relu", "Clip"}


@register_pass
class FuseQDQ(Pass):
    """Remove Q/DQ that buy nothing: re-quantization DQ→Q with equal parameters, and pairs on a tensor
    whose producer and readers all run in float.

    Guarantees: a removed DQ→Q chain with equal scale and zero point is exact (Q(DQ(x)) == x); a removed
    float-island pair only removes rounding; graph inputs and outputs are unchanged.
    """

    name = "fuse-qdq"

    def run(self, module, ctx) -> bool:
        graph = module.graph
        requant = self._drop_requantize(graph)
        islands = self._drop_float_islands(graph)
        if requant or islands:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if ctx is not None:
            ctx.log(removed_requantize=requant, removed_float_island_pairs=islands)
        return bool(requant or islands)

    @staticmethod
    def _drop_requantize(graph: gs.Graph) -> int:
        removed = 0
        for q in list(graph.nodes):
            if q.op != "QuantizeLinear" or not q.inputs[0].inputs:
                continue
            dq = q.inputs[0].inputs[0]
            if dq.op != "DequantizeLinear" or not _same_params(q, dq) or is_graph_output(graph, q.outputs[0]):
                continue
            replace_uses(q.outputs[0], dq.inputs[0])
            q.outputs.clear()
            q.inputs.clear()
            removed += 1
        return removed

    @staticmethod
    def _drop_float_islands(graph: gs.Graph) -> int:
        removed = 0
        for q, dq in activation_qdq_pairs(graph):
            x = q.inputs[0]
            producer_q = bool(x.inputs) and x.inputs[0].op in QUANTIZED_NEIGHBOURS
            readers_q = any(r.op in QUANTIZED_NEIGHBOURS for r in dq.outputs[0].outputs)
            if producer_q or readers_q or is_graph_output(graph, dq.outputs[0]):
                continue
            replace_uses(dq.outputs[0], x)
            q.inputs.clear()
            dq.outputs.clear()
            removed += 1
        return removed


def _same_params(q: gs.Node, dq: gs.Node) -> bool:
    def value(node, i):
        t = node.inputs[i] if len(node.inputs) > i else None
        return None if t is None or not isinstance(t, gs.Constant) else np.asarray(t.values)

    qs, ds = value(q, 1), value(dq, 1)
    qz, dz = value(q, 2), value(dq, 2)
    return (qs is not None and ds is not None and qs.shape == ds.shape and np.array_equal(qs, ds)
            and ((qz is None and dz is None) or (qz is not None and dz is not None and qz.dtype == dz.dtype
                                                 and np.array_equal(qz, dz))))
