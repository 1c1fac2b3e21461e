"""Seeded inputs that several suites draw alike (right-padded masks, logits made one
sequence at a time), and an input as a provider gets it."""

from __future__ import annotations

import torch


def right_padded_mask(b: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, T]`` bool: each row a prefix of valid tokens of random length in
    ``[max(1, T // 4), T]``, the first row full."""
    device = gen.device
    lengths = torch.randint(max(1, t // 4), t + 1, (b,), generator=gen, device=device)
    lengths[0] = t  # one full row
    return torch.arange(t, device=device).unsqueeze(0) < lengths.unsqueeze(1)


def random_logits(shape: tuple[int, int, int], dtype: torch.dtype,
                  gen: torch.Generator) -> torch.Tensor:
    """``[rows, T, V]`` logits of std 2 in `dtype`, drawn in fp32 one sequence at a time
    (no fp32 copy of the whole tensor)."""
    logits = torch.empty(shape, device=gen.device, dtype=dtype)
    for seq in range(shape[0]):
        noise = torch.randn(shape[1:], generator=gen, device=gen.device, dtype=torch.float32)
        logits[seq].copy_(noise.mul_(2.0))
        del noise
    return logits



def scaled_logits(shape: tuple[int, int], std: float, dtype: torch.dtype,
                  gen: torch.Generator) -> torch.Tensor:
    """``[N, V]`` logits of std `std` in `dtype`, drawn in fp32."""
    logits = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
    return logits.mul_(std).to(dtype)


def token_labels(n: int, v: int, ignore_index: int, gen: torch.Generator) -> torch.Tensor:
    """``[N]`` random labels in ``[0, V)``, ~3% of them `ignore_index` (the middle row
    always)."""
    labels = torch.randint(0, v, (n,), generator=gen, device=gen.device)
    ignored = torch.rand(n, generator=gen, device=gen.device) < 0.03
    ignored[n // 2] = True
    return labels.masked_fill(ignored, ignore_index)


def provider_input(tensor: torch.Tensor, grad: bool, fresh: bool) -> torch.Tensor:
    """`tensor` as a provider gets it: detached, requiring grad where `grad`; with
    `fresh` (a provider that writes into it), a copy as an op's output (not a view of a
    leaf, which inplace_backward refuses); autograd.grad w.r.t. the copy stops there."""
    x = tensor.detach().requires_grad_(grad)
    return x.clone() if fresh else x
