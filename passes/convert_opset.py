"""upgrade-opset: move a model to a newer default-domain opset with onnx's version converter."""

from __future__ import annotations

import onnx_graphsurgeon as gs
from onnx import version_converter

from compiler.errors import UnsupportedModelError
from compiler.passmanager import Option, Pass, register_pass


@register_pass
class UpgradeOpset(Pass):
    """Convert the model to opset `min` when it is older (per-channel QDQ needs opset 13).

    Guarantees: models already at or above `min` are untouched; the converted model computes the same
    outputs (onnx's converter adapts each op); a model the converter cannot handle raises an error naming
    the opset, instead of writing an invalid model.
    """

    name = "upgrade-opset"
    lossless = True
    OPTIONS = {"min": Option(int, 13, "lowest opset the rest of the pipeline needs", minimum=7)}

    def run(self, module, ctx) -> bool:
        old = module.opset
        if old >= self.min:
            return False
        proto = module.to_proto()
        inits = {t.name for t in proto.graph.initializer}
        kept = [i for i in proto.graph.input if i.name not in inits]  # old IR: weights listed as inputs
        del proto.graph.input[:]
        proto.graph.input.extend(kept)
        proto.ir_version = max(proto.ir_version, 7)
        try:
            converted = version_converter.convert_version(proto, self.min)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModelError(f"cannot convert the model from opset {old} to {self.min}: {first}") from None
        module.graph = gs.import_onnx(converted)
        module.opset_imports.update({imp.domain or "": imp.version for imp in converted.opset_import})
        module.ir_version = max(module.ir_version, converted.ir_version)
        if ctx is not None:
            ctx.log(from_opset=old, to_opset=self.min)
            ctx.warn(f"model upgraded from opset {old} to {self.min} (onnx version converter)")
        return True
