"""Which implementation runs: the Triton kernels or the plain PyTorch reference.

CUDA tensors run the Triton kernels. CPU tensors run `rlhf_fast.reference`, unless
``TRITON_INTERPRET=1`` is set (then the kernels run on the CPU through Triton's
interpreter, as the test suite does). ``RLHF_FAST_BACKEND=torch|triton`` overrides both.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton")


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the op on `tensor` should run the Triton kernels."""
    forced = os.environ.get("RLHF_FAST_BACKEND", "").strip().lower()
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if forced and forced not in BACKENDS:
        raise ValueError(f"RLHF_FAST_BACKEND must be one of {BACKENDS}, got {forced!r}")
    if forced == "torch":
        return False
    if tensor.is_cuda:
        return True
    if forced == "triton" and not interpret:
        raise ValueError(
            "RLHF_FAST_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before "
            "triton is imported"
        )
    return interpret
