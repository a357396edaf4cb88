"""drpc's compiler core: IR, pass manager, pipelines, targets, calibration data, CLI and Python API.

The public Python API is `compiler.api.compile_model` and `backends.simulator.simulate`.
"""
