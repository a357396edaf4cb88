"""Which zero weights a sparse accelerator can skip.

A target's `sparsity.group_size` g says how its zero-skipping sees a weight: the g weights one output reads
from g consecutive input channels at the same kernel position form a group, and a zero saves work only when
its whole group is zero (g = 1: every zero counts). The last group of a channel range may be shorter.
"""

from __future__ import annotations

import numpy as np


def reduction_axis(op: str, ndim: int, trans_b: int = 0) -> int | None:
    """The input-channel axis of a weight (the one the layer sums over), or None for an op without one:
    Conv 1, ConvTranspose 0, Gemm 1 with transB else 0, MatMul the second to last."""
    if op == "Conv":
        return 1
    if op == "ConvTranspose":
        return 0
    if op == "Gemm":
        return 1 if trans_b else 0
    if op == "MatMul":
        return ndim - 2
    return None


def skippable_zeros(weight: np.ndarray, axis: int, group_size: int = 1) -> int:
    """How many zero weights lie in all-zero groups of `group_size` consecutive entries along `axis`."""
    zero = np.asarray(weight) == 0
    if group_size <= 1:
        return int(np.count_nonzero(zero))
    moved = np.moveaxis(zero, axis, -1)
    channels = moved.shape[-1]
    padded = -(-channels // group_size) * group_size
    full = np.ones(moved.shape[:-1] + (padded,), dtype=bool)  # padding counts as zero, so a short group can skip
    full[..., :channels] = moved
    whole = full.reshape(moved.shape[:-1] + (-1, group_size)).all(axis=-1)
    return int(np.count_nonzero(np.repeat(whole, group_size, axis=-1)[..., :channels]))


def group_order(channels: int, taps: int, group_size: int) -> np.ndarray:
    """For weight rows laid out channel-major ([channel x taps], as a Conv weight flattens), the column order
    that puts each group's weights next to each other: tap-major, channels padded to a multiple of
    `group_size`; -1 marks a padding column."""
    padded = -(-channels // group_size) * group_size
    channel = np.tile(np.arange(padded), taps)
    tap = np.repeat(np.arange(taps), padded)
    return np.where(channel < channels, channel * taps + tap, -1)
