"""Benchmark of `rlhf_fast.optimal_token_baseline` against verl's code for it.

Inputs: the advantage suites' ``[B, T]`` shapes (B a multiple of ``GROUP_SIZE`` = 8
answers per prompt): fp32 token rewards, the rollout's old log-probs and log sum p^2, a
right-padded bool mask. Forward only: advantages are computed under no_grad.

Providers (same inputs, same process):

* ``rlhf_fast``: ``rlhf_fast.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2,
  8)``: one launch.
* ``eager``: verl's ``compute_optimal_token_baseline_advantage`` as it runs: returns by a
  flipped cumsum, w = 1 - 2 pi + sum pi^2, its masked cumsum, then a Python loop over the
  prompts (verl groups rows by uid in a dict; here each group is 8 consecutive rows),
  each with its slices, products, sums and a division, and the advantage; no IS weights.
  Its ``sum_pi_squared`` is ``exp(log_sum_p2)``, one elementwise op more than verl's.
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Every provider is first checked against ``rlhf_fast.reference.optimal_token_baseline`` in
float64 on the same inputs (relative error <= 1e-5); ``eager`` masks its returns as ours
(verl leaves the later rewards' sum at padding).

Bytes-moved floor (GB/s column), N = B * T: read rewards, old_logp, log_sum_p2 (fp32) and
the mask (bool), write advantages and returns (fp32): 4 * 3 N + N + 4 * 2 N = 21 N. The
kernel reads the rewards and the mask twice and the returns once more (one pass per
direction): 30 N, cache-hot for the second reads at these shapes' 8-row group tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import advantage, peers
from rlhf_fast.benchmarks.advantage import DTYPE, advantage_inputs
from rlhf_fast.benchmarks.cases import Case

OP = "optimal_token_baseline"
GROUP_SIZE = 8
#: verl's epsilon, and rlhf_fast.optimal_token_baseline's default.
OTB_EPS = 1e-8


# --------------------------------------------------------------------------- providers


def eager_optimal_token_baseline(rewards: torch.Tensor, mask: torch.Tensor,
                                 old_logp: torch.Tensor, log_sum_p2: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's OTB, one prompt group at a time, returns masked as ours."""
    m = mask.to(rewards.dtype)
    returns = (rewards * m).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    w = 1 - 2 * torch.exp(old_logp) + torch.exp(log_sum_p2)
    path = (w * m).cumsum(dim=-1)
    baselines = torch.zeros_like(returns)
    for start in range(0, rewards.shape[0], GROUP_SIZE):
        rows = slice(start, start + GROUP_SIZE)
        numerator = (returns[rows] * path[rows] * m[rows]).sum(dim=0)
        denominator = (path[rows] * m[rows]).sum(dim=0) + OTB_EPS
        baselines[rows] = (numerator / denominator).unsqueeze(0).expand(GROUP_SIZE, -1)
    return (returns - baselines) * m, returns * m


def rlhf_fast_optimal_token_baseline(rewards: torch.Tensor, mask: torch.Tensor,
                                     old_logp: torch.Tensor, log_sum_p2: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return rlhf_fast.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, GROUP_SIZE,
                                            eps=OTB_EPS)


def compiled_optimal_token_baseline(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return peers.compiled(eager_optimal_token_baseline)(*args)


PROVIDERS: dict[str, Callable[..., Any]] = {
    "rlhf_fast": rlhf_fast_optimal_token_baseline,
    "eager": eager_optimal_token_baseline,
    "compile": compiled_optimal_token_baseline,
}


# --------------------------------------------------------------------------- inputs


def make_inputs(shape: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """The advantage suites' rewards and mask; old_logp in (-3, 0) and log sum p^2
    between 2 old_logp and 0, as a real distribution's."""
    inputs = advantage_inputs(shape, DTYPE, device)
    gen = torch.Generator(device=device).manual_seed(4321)
    old_logp = -3 * torch.rand(shape, generator=gen, device=device, dtype=DTYPE)
    log_sum_p2 = torch.maximum(
        2 * old_logp, -2 * torch.rand(shape, generator=gen, device=device, dtype=DTYPE))
    return {"rewards": inputs["rewards"], "mask": inputs["mask"], "old_logp": old_logp,
            "log_sum_p2": log_sum_p2}


# --------------------------------------------------------------------------- one case


ARGS = ("rewards", "mask", "old_logp", "log_sum_p2")


def reference_optimal_token_baseline(rewards: torch.Tensor, mask: torch.Tensor,
                                     old_logp: torch.Tensor, log_sum_p2: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, GROUP_SIZE,
                                            eps=OTB_EPS)


SUITE = advantage.suite(
    OP, PROVIDERS, reference=reference_optimal_token_baseline, args=ARGS,
    outputs=("advantages", "returns"), make_inputs=make_inputs,
    # the floor (module docstring): 21 N bytes
    bytes_per_element=21,
)


def test_optimal_token_baseline(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
