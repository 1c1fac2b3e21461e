"""Benchmark of `rlhf_fast.group_advantages` against what trainers write instead.

Inputs: fp32 scores ``[B]``, B in {512, 8192} (quick: {64, 200}), in groups of
``GROUP_SIZE`` (8) completions of one prompt. Forward only: the op runs under no_grad in
a trainer.

Providers (same inputs, same process):

* ``rlhf_fast``: ``rlhf_fast.group_advantages(scores, group_size)``.
* ``eager``: TRL's GRPOTrainer: ``scores.view(-1, G)`` ``.mean(1)`` and ``.std(1)``
  (unbiased), each ``repeat_interleave(G)``, ``(scores - mean) / (std + eps)``; eps is
  rlhf_fast's default 1e-6 (TRL adds 1e-4), so that the gate compares like with like.
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Every provider is first checked against ``rlhf_fast.reference.group_advantages`` in
float64 on the same inputs (relative error <= 1e-5); one that does not match is reported
"wrong" and not timed.

Bytes-moved floor (GB/s column): read the scores, write the advantages (fp32): 8 B bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import cases, gates, peers
from rlhf_fast.benchmarks.cases import Case

OP = "group_advantages"
GPU_SHAPES = [(512,), (8192,)]
QUICK_SHAPES = [(64,), (200,)]
DTYPE = torch.float32
MODES = ("fwd",)
TOLERANCE = 1e-5
GROUP_SIZE = 8
#: Added to the std: rlhf_fast.group_advantages' default (TRL's GRPOTrainer adds 1e-4).
GROUP_EPS = 1e-6


# --------------------------------------------------------------------------- providers


def eager_group_advantages(scores: torch.Tensor) -> torch.Tensor:
    """GRPO advantages as TRL's GRPOTrainer computes them (with our eps)."""
    grouped = scores.view(-1, GROUP_SIZE)
    mean = grouped.mean(dim=1).repeat_interleave(GROUP_SIZE, dim=0)
    std = grouped.std(dim=1).repeat_interleave(GROUP_SIZE, dim=0)
    return (scores - mean) / (std + GROUP_EPS)


def rlhf_fast_group_advantages(scores: torch.Tensor) -> torch.Tensor:
    return rlhf_fast.group_advantages(scores, GROUP_SIZE, eps=GROUP_EPS)


def compiled_group_advantages(scores: torch.Tensor) -> torch.Tensor:
    return peers.compiled(eager_group_advantages)(scores)


PROVIDERS: dict[str, Callable[..., torch.Tensor]] = {
    "rlhf_fast": rlhf_fast_group_advantages,
    "eager": eager_group_advantages,
    "compile": compiled_group_advantages,
}


# --------------------------------------------------------------------------- inputs


def make_inputs(shape: tuple[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Random fp32 scores ``[B]``."""
    gen = torch.Generator(device=device).manual_seed(1234)
    return {"scores": torch.randn(shape, generator=gen, device=device, dtype=DTYPE)}


# --------------------------------------------------------------------------- one case


def reference_group_advantages(scores: torch.Tensor) -> torch.Tensor:
    return reference.group_advantages(scores, GROUP_SIZE, eps=GROUP_EPS)


SUITE = cases.Suite(
    OP, cases.sizes(GPU_SHAPES, DTYPE), cases.sizes(QUICK_SHAPES, DTYPE), MODES, PROVIDERS,
    make_inputs=lambda case, device: make_inputs(case.shape, device),
    gate=gates.forward_gate(reference_group_advantages, ("scores",), ("advantages",),
                            TOLERANCE),
    timed=cases.forward_call(("scores",)),
    # the floor (module docstring): 8 B bytes
    columns=cases.copy_bandwidth_columns(lambda case: (4 + 4) * math.prod(case.shape)),
)


def test_group_advantages(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
