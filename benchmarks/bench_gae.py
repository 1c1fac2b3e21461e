"""Benchmark of `rlhf_fast.gae` against what trainers write instead.

Inputs: fp32 rewards and values ``[B, T]`` and a right-padded bool mask (each row a
prefix of valid tokens, one row full), gamma 1.0, lam 0.95, no bootstrap value. Forward
only: the op runs under no_grad in a trainer.

Providers (same inputs, same process):

* ``rlhf_fast``: ``rlhf_fast.gae(rewards, values, mask, gamma=, lam=)``.
* ``python-loop``: TRL's loop on the device: values and rewards zeroed where masked, then
  ``for t in reversed(range(T))``: ``nextvalues = values[:, t + 1]`` (0 past the end),
  ``delta = rewards[:, t] + gamma * nextvalues - values[:, t]``,
  ``lastgaelam = delta + gamma * lam * lastgaelam``; ``torch.stack`` of the reversed
  list, returns = advantages + values. With right padding the zeroed tail makes this
  exact (advantages and returns 0 at padded positions). About 5 kernel launches per
  step, so it is slow at T = 4096: timed with a small repetition budget.
* ``compile``: ``torch.compile`` of that loop function (GPU only; skipped in CPU quick
  mode). Dynamo unrolls the loop over T: compiling takes about a minute at T = 512
  (measured on a CPU host) and grows with T, so cases with T > ``COMPILE_MAX_T`` (512;
  env ``RLHF_FAST_BENCH_GAE_COMPILE_MAX_T`` overrides) are skipped with that reason.
* ``compile-step``: what a user compiles instead at long T: the same loop in Python with
  its step (delta and the recurrence, one fused kernel) compiled once; T launches.
  GPU only, like ``compile``.

Every provider is first checked against ``rlhf_fast.reference.gae`` in float64 on the
same inputs (relative error <= 1e-5, advantages and returns); one that does not match is
reported "wrong" and not timed.

Bytes-moved floor (GB/s column), with N = B * T: read rewards and values (fp32) and the
bool mask, write advantages and returns (fp32): 4 N + 4 N + N + 4 N + 4 N = 17 N bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import advantage, peers
from rlhf_fast.benchmarks.cases import Budget, Case

OP = "gae"
GAMMA = 1.0
LAM = 0.95
#: Providers timed with the small budget: one call is ~100 ms at T = 4096 on a GPU.
SLOW = ("python-loop", "compile-step")
SLOW_BUDGET = Budget(warmup_ms=10, rep_ms=50, cpu_repeats=3)
#: Longest T at which the unrolled loop is compiled (compile time grows with T).
COMPILE_MAX_T = int(os.environ.get("RLHF_FAST_BENCH_GAE_COMPILE_MAX_T", "512"))

Outputs = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- providers


def loop_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> Outputs:
    """GAE as TRL's PPO trainer writes it (right padding handled by zeroing)."""
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    gen_len = rewards.shape[-1]
    lastgaelam = 0.0
    advantages_reversed = []
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + GAMMA * nextvalues - values[:, t]
        lastgaelam = delta + GAMMA * LAM * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


def rlhf_fast_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> Outputs:
    return rlhf_fast.gae(rewards, values, mask, gamma=GAMMA, lam=LAM)


def compiled_loop_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> Outputs:
    return peers.compiled(loop_gae)(rewards, values, mask)


def gae_step(reward: torch.Tensor, value: torch.Tensor, next_value: torch.Tensor,
             next_advantage: torch.Tensor) -> torch.Tensor:
    """One step of the recurrence, [B] columns: the body `compile-step` compiles."""
    delta = reward + GAMMA * next_value - value
    return delta + GAMMA * LAM * next_advantage


def step_compiled_loop_gae(rewards: torch.Tensor, values: torch.Tensor,
                           mask: torch.Tensor) -> Outputs:
    """`loop_gae` with its step compiled: tensors only, so one graph serves every t."""
    step = peers.compiled(gae_step)
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    zero = torch.zeros_like(values[:, 0])
    advantage, advantages_reversed = zero, []
    for t in reversed(range(rewards.shape[-1])):
        next_value = values[:, t + 1] if t < rewards.shape[-1] - 1 else zero
        advantage = step(rewards[:, t], values[:, t], next_value, advantage)
        advantages_reversed.append(advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


PROVIDERS: dict[str, Callable[..., Outputs]] = {
    "rlhf_fast": rlhf_fast_gae,
    "python-loop": loop_gae,
    "compile": compiled_loop_gae,
    "compile-step": step_compiled_loop_gae,
}


# --------------------------------------------------------------------------- one case


ARGS = ("rewards", "values", "mask")


def reference_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> Outputs:
    return reference.gae(rewards, values, mask, gamma=GAMMA, lam=LAM)


def _skip(case: Case, device: torch.device) -> str | None:
    if case.provider == "compile" and case.shape[1] > COMPILE_MAX_T:
        return f"compiling the loop unrolled over T > {COMPILE_MAX_T} steps takes too long"
    return None


SUITE = advantage.suite(
    OP, PROVIDERS, reference=reference_gae, args=ARGS, outputs=("advantages", "returns"),
    # random rewards and values; right-padded bool mask with lengths in [T/4, T]; the
    # floor (module docstring): 17 N bytes
    bytes_per_element=4 + 4 + 1 + 4 + 4,
    skip=_skip,
    budget=lambda case: SLOW_BUDGET if case.provider in SLOW else Budget(),
)


def test_gae(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
