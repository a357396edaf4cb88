"""The int8 quantizers bench/ptq.py compares, each runnable alone in a fresh process.

Every function takes a task (only `task.model` and `task.input_name` are read), the calibration inputs saved
as .npy, and the path to write the quantized ONNX model to. Each peer runs with its documented int8 recipe
for a QDQ model (int8 per-channel weights, 8-bit activations calibrated on the same samples as drpc), fed one
sample at a time so a model with a fixed batch of 1 works too.

The peers pin libraries that do not agree with each other (onnx, onnxruntime, torch builds), so each may
run from its own virtual environment: this file needs only onnx and numpy besides the tool, and

    python bench/quantizers.py TOOL MODEL INPUT_NAME CALIB.npy OUT.onnx

is what bench/ptq.py runs, with the interpreter given for that tool (`--python quark=/venvs/quark/bin/python`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx.version_converter

HERE = Path(__file__).resolve().parent


def at_least_opset13(model: onnx.ModelProto) -> onnx.ModelProto:
    """The peers quantize opset >= 13 only (per-channel DequantizeLinear; NNCF refuses < 10): an older model is
    upgraded with onnx's version converter first, as a user of any of them would, and to IR version 7 when
    older than 4 (ModelOpt's checker refuses initializers that are not graph inputs below IR 4)."""
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 13:
        return model
    upgraded = onnx.version_converter.convert_version(model, 13)
    upgraded.ir_version = max(upgraded.ir_version, 7)
    return upgraded


def _source(task, out: Path) -> Path:
    """The model file a peer reads: a copy of the task's model (upgraded to opset 13 when older) beside `out`.
    Never the original: ModelOpt writes its shape-inferred model back over the file it is given."""
    path = out.with_suffix(".input.onnx")
    onnx.save(at_least_opset13(onnx.load(str(task.model))), str(path))
    return path


def _samples(task, calib_path: Path):
    """The calibration inputs one at a time, as {input name: [1, ...] array}."""
    x = np.load(calib_path)
    return [{task.input_name: x[i:i + 1]} for i in range(len(x))]


def _reader(task, calib_path: Path):
    """An onnxruntime CalibrationDataReader over the calibration inputs (onnxruntime and Quark read these)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = _samples(task, calib_path)
            self.it = iter(self.samples)

        def get_next(self):
            return next(self.it, None)

        def rewind(self):
            self.it = iter(self.samples)

    return Reader()


def quantize_ort(task, calib_path: Path, out: Path) -> None:
    """onnxruntime: quant_pre_process, then quantize_static (QDQ, per-channel, MinMax, U8 act / S8 weights)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = _source(task, out)
    pre = out.with_suffix(".pre.onnx")
    with contextlib.chdir(out.parent):  # a failed symbolic shape inference saves its partial model in cwd
        try:
            quant_pre_process(str(source), str(pre))
        except Exception:  # its symbolic shape inference fails on some models: the documented fallback
            try:
                quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
            except Exception:  # quantize the model as it is
                pre = source

    def quantize(**extra):
        quantize_static(str(pre), str(out), _reader(task, calib_path), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, extra_options=extra)

    try:
        quantize()
    except ValueError:  # its int32-bias scale adjustment fails on a bias that is not 1-D (mnist_cntk): turn it off
        quantize(QDQDisableWeightAdjustForInt32Bias=True)


def quantize_nncf(task, calib_path: Path, out: Path, per_tensor: bool = False) -> None:
    """NNCF on the ONNX model: preset MIXED, fast bias correction (its default). Its CPU settings give a tensor
    read by a depthwise conv one scale per channel; `per_tensor` forces one scale per activation tensor, the
    scheme DRP-AI deploys (DESIGN.md: activations uint8 per-tensor) and drpc writes."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    samples = _samples(task, calib_path)
    model = at_least_opset13(onnx.load(str(task.model)))
    dataset = nncf.Dataset(samples)
    one_scale = QuantizationParameters(per_channel=False)
    advanced = AdvancedQuantizationParameters(activations_quantization_params=one_scale) if per_tensor else None
    q = nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(samples),
                      advanced_parameters=advanced)
    onnx.save(q, str(out))


def quantize_quark(task, calib_path: Path, out: Path) -> None:
    """AMD Quark (quark.onnx): int8 per-channel symmetric weights, uint8 asymmetric activations, both calibrated
    by its default Percentile method; everything else as QConfig defaults it."""
    from quark.onnx import ModelQuantizer, QConfig
    from quark.onnx.quantization.config.spec import Int8Spec, QLayerConfig, QuantGranularity, UInt8Spec

    config = QConfig(global_config=QLayerConfig(activation=UInt8Spec(),
                                                weight=Int8Spec(quant_granularity=QuantGranularity.Channel)))
    with contextlib.chdir(out.parent):
        ModelQuantizer(config).quantize_model(str(_source(task, out)), str(out), _reader(task, calib_path))


def quantize_modelopt(task, calib_path: Path, out: Path) -> None:
    """NVIDIA ModelOpt (modelopt.onnx.quantization), int8 mode with its default entropy calibration, on the CPU.
    What it leaves unquantized stays float32 (its default casts it to fp16, which is for TensorRT)."""
    from modelopt.onnx.quantization import quantize

    x = np.load(calib_path)
    with contextlib.chdir(out.parent):
        quantize(str(_source(task, out)), quantize_mode="int8", calibration_data={task.input_name: x},
                 calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(out))


def quantize_aimet(task, calib_path: Path, out: Path) -> None:
    """Qualcomm AIMET (aimet_onnx): QuantizationSimModel with its default per-channel config, int8 weights and
    activations, min-max encodings, written out as QDQ (activations unsigned)."""
    from aimet_onnx.quantsim import QuantizationSimModel

    model = at_least_opset13(onnx.load(str(task.model)))
    work = out.with_suffix(".aimet")  # its own folder: AIMET saves model.onnx there and refuses to overwrite
    work.mkdir(exist_ok=True)
    with contextlib.chdir(work):
        sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", path=str(work))
        sim.compute_encodings(_samples(task, calib_path))
        onnx.save(sim.to_onnx_qdq(), str(out))


def quantize_drpc(task, calib_path: Path, out: Path, method: str = "default") -> None:
    """drpc's default rzv2h pipeline (no pruning) through the Python API (in this repository's environment)."""
    sys.path.insert(0, str(HERE.parent))
    from compiler.api import compile_model

    pkg = out.with_suffix("")
    compile_model(task.model, "rzv2h", pkg, calib=calib_path, calib_method=None if method == "default" else method,
                  force=True)
    os.replace(pkg / "model.onnx", out)


QUANTIZERS = {"ort": quantize_ort, "nncf": quantize_nncf, "nncf_pt": partial(quantize_nncf, per_tensor=True),
              "quark": quantize_quark, "modelopt": quantize_modelopt,
              "aimet": quantize_aimet, "drpc": quantize_drpc}


def main(argv: list[str]) -> None:
    """TOOL MODEL INPUT_NAME CALIB OUT [DRPC_METHOD]: quantize, then print {"seconds": ...} as the last line."""
    tool, model, input_name, calib, out = argv[:5]
    task = SimpleNamespace(model=Path(model), input_name=input_name)
    start = time.perf_counter()
    extra = argv[5:] if tool == "drpc" else []
    QUANTIZERS[tool](task, Path(calib), Path(out), *extra)
    print(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main(sys.argv[1:])
