"""What the reference ops share: the dtype they reduce in, NaN that reaches gradients."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in fp32 whatever the input, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nan_where(bad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A constant factor: NaN where `bad`, 1 elsewhere. Multiplying by it makes a value NaN
    in its gradient too (torch.where would give the NaN branch a gradient of 0)."""
    return torch.ones_like(like).masked_fill(bad, float("nan"))
