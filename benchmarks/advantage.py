"""What the advantage suites share (``gae``, ``masked_whiten``, ``masked_mean``,
``optimal_token_baseline``): their sizes, dtype and tolerance, the rewards, values and
mask they draw, and their `cases.Suite` (gated against the float64 reference, timed
under no_grad, its floor a number of bytes per ``[B, T]`` element; the masked means
also differentiated)."""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Backward:
    """The backward of an advantage suite's op with one output: the input it
    differentiates, the floor's bytes per ``[B, T]`` element, and the output's shape
    (of the inputs'), which the random upstream gradient has."""

    wrt: str
    bytes_per_element: int
    output_shape: Callable[[tuple[int, int]], tuple[int, ...]]


def suite(op: str, providers: dict[str, Any], *, reference: Callable[..., Any],
          args: Sequence[str], outputs: Sequence[str], bytes_per_element: int,
          make_inputs: Callable[[Any, torch.device], dict[str, torch.Tensor]] | None = None,
          backward: Backward | None = None, **fields: Any) -> cases.Suite:
    """An advantage suite, forward only: its providers called on ``inputs[a] for a in
    args`` (`make_inputs(shape, device)`, by default `advantage_inputs`), gated against
    `reference` by output name (`gates.forward_gate`), its floor `bytes_per_element`
    bytes per ``[B, T]`` element. With `backward`, a ``fwd+bwd`` mode too: the gradient
    for a random upstream one (``inputs["upstream"]``, added to `make_inputs`'s) gated
    as well (`gates.gradient_gate`). `fields`: its other `cases.Suite` fields."""
    if make_inputs is None:
        def make_inputs(shape: Any, device: torch.device) -> dict[str, torch.Tensor]:
            return advantage_inputs(shape, DTYPE, device)

    if backward is None:
        modes: tuple[str, ...] = ("fwd",)
        gate = gates.forward_gate(reference, args, outputs, TOLERANCE)
        timed = cases.forward_call(args)
        backward_bytes = 0
        inputs = make_inputs
    else:
        (output,) = outputs
        modes = ("fwd", "fwd+bwd")
        gate = gates.gradient_gate(reference, args, output, backward.wrt, TOLERANCE)
        timed = _differentiated_call(args, backward.wrt)
        backward_bytes = backward.bytes_per_element
        inputs = _with_upstream(make_inputs, backward.output_shape)

    def bytes_moved(case: cases.Case) -> int:
        per_element = bytes_per_element + (backward_bytes if case.mode != "fwd" else 0)
        return per_element * math.prod(case.shape)

    return cases.Suite(
        op, cases.sizes(SHAPES, DTYPE), cases.sizes(QUICK_SHAPES, DTYPE), modes, providers,
        make_inputs=lambda case, device: inputs(case.shape, device),
        gate=gate, timed=timed, columns=cases.copy_bandwidth_columns(bytes_moved), **fields,
    )


def _with_upstream(make_inputs: Callable[[Any, torch.device], dict[str, torch.Tensor]],
                   output_shape: Callable[[tuple[int, int]], tuple[int, ...]]
                   ) -> Callable[[Any, torch.device], dict[str, torch.Tensor]]:
    def inputs(shape: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
        drawn = make_inputs(shape, device)
        gen = torch.Generator(device=device).manual_seed(4321)
        drawn["upstream"] = torch.randn(output_shape(shape), generator=gen, device=device,
                                        dtype=DTYPE)
        return drawn

    return inputs


def _differentiated_call(args: Sequence[str], wrt: str) -> Callable[..., cases.Timed]:
    """``fwd``: the provider under no_grad (as a trainer runs it); the backward modes:
    `cases.timed_calls` w.r.t. ``inputs[wrt]`` for the upstream gradient."""
    def timed(case: cases.Case, inputs: dict[str, torch.Tensor], fn: Any) -> cases.Timed:
        if case.mode == "fwd":
            return cases.forward_call(args)(case, inputs, fn)
        return cases.timed_calls(
            inputs[wrt], lambda x: fn(*(x if a == wrt else inputs[a] for a in args)),
            case.mode, fresh=False, grads=inputs["upstream"])

    return timed
