"""fuse-matmul-add: turn MatMul(x, W) (+ bias) into one Gemm when x is a matrix."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from compiler.passmanager import Pass, register_pass
from compiler.rewrite import bypass, const_value, fresh_name, sole_consumer


@register_pass
class FuseMatMulAdd(Pass):
    """Replace Add(MatMul(x, W), b) by Gemm(x, W, b), and a MatMul(x, W) with no such Add by Gemm(x, W), for a
    rank-2 x, constant 2-D W and constant b.

    Gemm is the layer form the rest of drpc (channel pruning's dependency analysis, the refit) knows; a
    bias-free Linear exports to a lone MatMul. b must broadcast as [N] or [1, N]. Guarantees: outputs unchanged
    up to float rounding; MatMuls between two activations and batched (rank > 2) MatMuls are left alone.
    """

    name = "fuse-matmul-add"
    lossless = True

    def run(self, module, ctx) -> bool:
        graph = module.graph
        fused = converted = 0
        for mm in list(graph.nodes):
            if mm.op != "MatMul" or mm.domain:
                continue
            x, w_t = mm.inputs
            w = const_value(w_t)
            if w is None or w.ndim != 2 or w.dtype.kind != "f" or x.shape is None or len(x.shape) != 2:
                continue
            add, b = sole_consumer(graph, mm.outputs[0]), None
            if add is not None and add.op == "Add":
                other = add.inputs[1] if add.inputs[0] is mm.outputs[0] else add.inputs[0]
                b = const_value(other)
            if b is None or b.size != w.shape[1] or b.ndim > 2 or (b.ndim == 2 and b.shape[0] != 1) \
                    or b.dtype != w.dtype:
                mm.op, mm.name = "Gemm", fresh_name(graph, mm.name + "_gemm")
                converted += 1
                continue
            bias = gs.Constant(fresh_name(graph, mm.name + "_bias"), b.reshape(-1))
            out = add.outputs[0]
            gemm = gs.Node("Gemm", name=fresh_name(graph, mm.name + "_gemm"), inputs=[x, w_t, bias],
                           outputs=[gs.Variable(fresh_name(graph, out.name + "_gemm"), dtype=out.dtype, shape=out.shape)])
            graph.nodes.append(gemm)
            if bypass(graph, add, gemm.outputs[0], out):
                mm.outputs.clear()
                mm.inputs.clear()
                fused += 1
            else:
                gemm.inputs.clear()
                gemm.outputs.clear()
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if ctx is not None:
            ctx.log(fused=fused, converted=converted)
        return fused + converted > 0
