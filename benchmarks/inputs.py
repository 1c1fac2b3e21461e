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


#: ``[B, T]`` of the advantage suites (gae, masked_whiten): GPU, and quick mode.
ADVANTAGE_SHAPES = [(64, 512), (64, 4096), (512, 512), (512, 4096)]
ADVANTAGE_QUICK_SHAPES = [(8, 64), (16, 200)]


def advantage_inputs(shape: tuple[int, int], dtype: torch.dtype,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """What a trainer computes advantages from (the gae and masked_whiten suites):
    random rewards (std 0.1) and values ``[B, T]`` and a right-padded bool mask."""
    gen = torch.Generator(device=device).manual_seed(1234)
    rewards = torch.randn(shape, generator=gen, device=device, dtype=dtype) * 0.1
    values = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return {"rewards": rewards, "values": values, "mask": right_padded_mask(*shape, gen)}


def provider_input(tensor: torch.Tensor, grad: bool, fresh: bool) -> torch.Tensor:
    """`tensor` as a provider gets it: detached, requiring grad where `grad`; with
    `fresh` (a provider that writes into it), a copy as an op's output (not a view of a
    leaf, which inplace_backward refuses); autograd.grad w.r.t. the copy stops there."""
    x = tensor.detach().requires_grad_(grad)
    return x.clone() if fresh else x
