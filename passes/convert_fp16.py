"""convert-fp16: produce the fp16 model that first-generation DRP-AI targets run."""

from __future__ import annotations

import onnx_graphsurgeon as gs
from onnxruntime.transformers.float16 import convert_float_to_float16

from compiler.passmanager import Pass, register_pass

# Kept in float32: ops whose fp16 kernels are missing in onnxruntime or that need the range.
KEEP_FLOAT = ["Range", "NonMaxSuppression", "TopK", "RoiAlign", "CumSum", "Resize", "Upsample", "If", "Loop",
              "LSTM", "GRU", "RNN", "Softplus", "Exp", "Log", "Pow", "Sqrt", "ReduceMean", "ReduceSum", "LayerNormalization"]


@register_pass
class ConvertFp16(Pass):
    """Convert float32 weights and activations to float16; graph inputs and outputs stay float32.

    Uses onnxruntime's float16 converter (Cast nodes at the borders of float32 islands). Guarantees: the
    model's interface is unchanged; ops listed in KEEP_FLOAT, custom-domain ops and nodes named in
    ctx.options["exclude"] stay float32.
    """

    name = "convert-fp16"

    def run(self, module, ctx) -> bool:
        exclude = set((ctx.options.get("exclude") or []) if ctx is not None else [])
        graph = module.graph
        block_nodes = [n.name for n in graph.nodes if n.name in exclude or n.op in exclude or n.domain]
        proto = module.to_proto(infer_shapes=True)
        converted = convert_float_to_float16(proto, keep_io_types=True, op_block_list=KEEP_FLOAT,
                                             node_block_list=block_nodes, disable_shape_infer=True)
        module.graph = gs.import_onnx(converted)
        if ctx is not None:
            ctx.log(kept_float_ops=sorted({n.op for n in graph.nodes if n.op in KEEP_FLOAT}), kept_float_nodes=block_nodes)
        return True
