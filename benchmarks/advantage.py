"""What the advantage suites share (``gae``, ``masked_whiten``, ``optimal_token_baseline``):
their sizes, dtype and tolerance, the rewards, values and mask they draw, and their
forward-only `cases.Suite` (gated against the float64 reference, timed under no_grad,
its floor a number of bytes per ``[B, T]`` element)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhf_fast.benchmarks import cases, gates
from rlhf_fast.benchmarks.inputs import right_padded_mask

#: ``[B, T]``: GPU, and quick mode.
SHAPES = [(64, 512), (64, 4096), (512, 512), (512, 4096)]
QUICK_SHAPES = [(8, 64), (16, 200)]
DTYPE = torch.float32
#: Relative-error tolerance of the correctness gate.
TOLERANCE = 1e-5


def advantage_inputs(shape: tuple[int, int], dtype: torch.dtype,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """What a trainer computes advantages from (the gae and masked_whiten suites):
    random rewards (std 0.1) and values ``[B, T]`` and a right-padded bool mask."""
    gen = torch.Generator(device=device).manual_seed(1234)
    rewards = torch.randn(shape, generator=gen, device=device, dtype=dtype) * 0.1
    values = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return {"rewards": rewards, "values": values, "mask": right_padded_mask(*shape, gen)}


def suite(op: str, providers: dict[str, Any], *, reference: Callable[..., Any],
          args: Sequence[str], outputs: Sequence[str], bytes_per_element: int,
          make_inputs: Callable[[Any, torch.device], dict[str, torch.Tensor]] | None = None,
          **fields: Any) -> cases.Suite:
    """An advantage suite, forward only: its providers called on ``inputs[a] for a in
    args`` (`make_inputs(shape, device)`, by default `advantage_inputs`), gated against
    `reference` by output name (`gates.forward_gate`), its floor `bytes_per_element`
    bytes per ``[B, T]`` element. `fields`: its other `cases.Suite` fields."""
    if make_inputs is None:
        def make_inputs(shape: Any, device: torch.device) -> dict[str, torch.Tensor]:
            return advantage_inputs(shape, DTYPE, device)

    return cases.Suite(
        op, cases.sizes(SHAPES, DTYPE), cases.sizes(QUICK_SHAPES, DTYPE), ("fwd",), providers,
        make_inputs=lambda case, device: make_inputs(case.shape, device),
        gate=gates.forward_gate(reference, args, outputs, TOLERANCE),
        timed=cases.forward_call(args),
        columns=cases.copy_bandwidth_columns(
            lambda case: bytes_per_element * math.prod(case.shape)),
        **fields,
    )
