"""Differential fuzzing: random CNN graphs through the lossless passes, the full pipeline and channel pruning."""

import numpy as np
from hypothesis import HealthCheck, given, settings

from compiler.context import CompileContext
from compiler.instrument import LosslessCheck
from compiler.ir import Module
from compiler.pipeline import parse_pipeline
from fuzz_checks import check_model
from graph_fuzzer import cnn_models

LOSSLESS = ("upgrade-opset{min=14},fold-constants,eliminate-identity,eliminate-dead-code,reduce-mean-to-pool,"
            "fuse-conv-bn,fuse-conv-add,merge-parallel-convs,fuse-conv-add,fuse-pad-conv,drop-padding-taps,fuse-matmul-add,fuse-hardswish")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cnn_models())
def test_lossless_passes_keep_outputs(model):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    feed = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    check = LosslessCheck(feed, rtol=1e-4)
    parse_pipeline(LOSSLESS).instrument(check).run(Module.from_proto(model), CompileContext())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cnn_models())
def test_pipeline_and_channel_pruning_give_packages_the_simulator_accepts(model):
    assert check_model(model) == []
