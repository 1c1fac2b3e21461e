"""Launcher helpers shared by the kernel files (plain Python, no kernels)."""

from __future__ import annotations

import math
import struct

import torch


def split_fp64(value: float) -> tuple[float, float]:
    """(hi, lo) fp32 values with hi + lo == value to ~48 bits (Triton float args are fp32).

    A kernel rebuilds the value as ``(tl.zeros([], acc_dtype) + hi) + lo``: exact enough
    for fp64 accumulation, and just `hi` in fp32.
    """
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi if math.isfinite(value) else 0.0  # inf - inf would be NaN


def mask_view(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask read as bytes (same storage, no copy); other dtypes unchanged."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask
