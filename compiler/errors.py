"""Typed errors a user can cause. The CLI turns each into one line on stderr and an exit code."""


class DrpcError(Exception):
    """Base of every user-facing error: the message is one line naming the file, node, pass or option."""

    exit_code = 1


class UsageError(DrpcError):
    """Wrong usage: an option value outside its range, an unknown name, a conflicting flag."""

    exit_code = 2


class ModelLoadError(DrpcError):
    """The model file is missing, unreadable, not ONNX, or rejected by onnx's checker."""


class UnsupportedModelError(DrpcError):
    """The model holds a construct drpc cannot compile; the message names the node and the construct."""


class CalibrationDataError(DrpcError):
    """Calibration data does not fit the model; the message names the file and the input."""


class TargetError(UsageError):
    """Unknown target or an invalid target description."""


class PassError(DrpcError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class MemoryPlanError(DrpcError):
    """The model does not fit the target's memory area; the message names the peak requirement."""


class PackageError(DrpcError):
    """A deployment package is missing a file or is inconsistent (raised by the simulator)."""
