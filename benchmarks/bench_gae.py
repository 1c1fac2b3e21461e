"""Benchmark of `rlhf_fast.gae` against the reverse Python loop trainers write.

Inputs: fp32 rewards and values ``[B, T]`` and a right-padded bool mask (each row a
prefix of valid tokens, one row full), gamma 1.0, lam 0.95, no bootstrap value. Forward
only: GAE runs under no_grad in a trainer.

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
same inputs (advantages and returns, relative error <= 1e-5); one that does not match is
reported "wrong" and not timed.

Bytes-moved floor (GB/s column), with N = B * T: read rewards and values (fp32) and the
bool mask, write advantages and returns (fp32): 4 N + 4 N + N + 4 N + 4 N = 17 N bytes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import harness

OP = "gae"
GPU_SHAPES = [(64, 512), (64, 4096), (512, 512), (512, 4096)]
QUICK_SHAPES = [(8, 64), (16, 200)]
DTYPE = torch.float32
PROVIDERS = ("rlhf_fast", "python-loop", "compile", "compile-step")
MODE = "fwd"
TOLERANCE = 1e-5
GAMMA = 1.0
LAM = 0.95
#: do_bench budgets (ms) of the python loop: one call is ~100 ms at T = 4096 on a GPU.
LOOP_WARMUP_MS = 10
LOOP_REP_MS = 50
#: Longest T at which the unrolled loop is compiled (compile time grows with T).
COMPILE_MAX_T = int(os.environ.get("RLHF_FAST_BENCH_GAE_COMPILE_MAX_T", "512"))

Outputs = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: shape and provider."""

    shape: tuple[int, int]
    provider: str

    @property
    def id(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}-fp32-{MODE}-{self.provider}"


def cases(quick: bool) -> list[Case]:
    """All cases, in table order: shape, provider."""
    return [
        Case(shape, provider)
        for shape in (QUICK_SHAPES if quick else GPU_SHAPES)
        for provider in PROVIDERS
    ]


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
    return harness.compiled(loop_gae)(rewards, values, mask)


def gae_step(reward: torch.Tensor, value: torch.Tensor, next_value: torch.Tensor,
             next_advantage: torch.Tensor) -> torch.Tensor:
    """One step of the recurrence, [B] columns: the body `compile-step` compiles."""
    delta = reward + GAMMA * next_value - value
    return delta + GAMMA * LAM * next_advantage


def step_compiled_loop_gae(rewards: torch.Tensor, values: torch.Tensor,
                           mask: torch.Tensor) -> Outputs:
    """`loop_gae` with its step compiled: tensors only, so one graph serves every t."""
    step = harness.compiled(gae_step)
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


PROVIDER_FNS: dict[str, Callable[..., Outputs]] = {
    "rlhf_fast": rlhf_fast_gae,
    "python-loop": loop_gae,
    "compile": compiled_loop_gae,
    "compile-step": step_compiled_loop_gae,
}


# --------------------------------------------------------------------------- inputs


def make_inputs(shape: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """Random fp32 rewards and values; right-padded bool mask with lengths in [T/4, T]."""
    b, t = shape
    gen = torch.Generator(device=device).manual_seed(1234)
    rewards = torch.randn(shape, generator=gen, device=device, dtype=DTYPE) * 0.1
    values = torch.randn(shape, generator=gen, device=device, dtype=DTYPE)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen, device=device)
    lengths[0] = t  # one full row
    mask = torch.arange(t, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    return {"rewards": rewards, "values": values, "mask": mask}


def bytes_moved(shape: tuple[int, int]) -> int:
    """Read rewards, values (fp32) and the bool mask; write advantages, returns: 17 N."""
    n = shape[0] * shape[1]
    return (4 + 4 + 1 + 4 + 4) * n


# --------------------------------------------------------------------------- one case


def _gate(
    inp: dict[str, torch.Tensor], fn: Callable[..., Outputs]
) -> tuple[bool, dict[str, float]]:
    """Run the provider once; compare advantages and returns with the float64 reference."""
    ref = reference.gae(
        inp["rewards"].double(), inp["values"].double(), inp["mask"], gamma=GAMMA, lam=LAM
    )
    outs = fn(inp["rewards"], inp["values"], inp["mask"])
    errors: dict[str, float] = {}
    ok = len(outs) == 2
    for name, out, r in zip(("advantages", "returns"), outs, ref):
        good, errors[name] = harness.check_close(out, r, TOLERANCE)
        ok &= good
    return ok, errors



def run_case(case: Case, session: Any, benchmark: Any) -> tuple[dict[str, Any], str | None]:
    """Gate and time one case. Returns its row and the pytest outcome to raise (or None)."""
    device = session.device
    row_args = dict(op=OP, shape=case.shape, dtype=DTYPE, provider=case.provider, mode=MODE)
    if case.provider in ("compile", "compile-step") and device.type != "cuda":
        reason = "torch.compile skipped in CPU quick mode"
        return harness.make_row(status=harness.status_skipped(reason), **row_args), "skip"
    if case.provider == "compile" and case.shape[1] > COMPILE_MAX_T:
        reason = f"compiling the loop unrolled over T > {COMPILE_MAX_T} steps takes too long"
        return harness.make_row(status=harness.status_skipped(reason), **row_args), "skip"
    if case.provider == "rlhf_fast" and not callable(getattr(rlhf_fast, "gae", None)):
        reason = "rlhf_fast.gae not available"
        return harness.make_row(status=harness.status_skipped(reason), **row_args), "skip"

    inp = make_inputs(case.shape, device)
    rewards, values, mask = inp["rewards"], inp["values"], inp["mask"]

    def gate(fn: Callable[..., Outputs]) -> tuple[bool, dict[str, float]]:
        with torch.no_grad():
            return _gate(inp, fn)

    def prepare(fn: Callable[..., Outputs]) -> tuple[Callable[[], Outputs], None]:
        def timed() -> Outputs:
            with torch.no_grad():
                return fn(rewards, values, mask)

        return timed, None

    slow = case.provider in ("python-loop", "compile-step")
    budget = dict(warmup_ms=LOOP_WARMUP_MS, rep_ms=LOOP_REP_MS) if slow else {}
    return harness.gate_and_time(
        benchmark=benchmark, device=device, row_args=row_args,
        group=f"{OP} {case.id.removesuffix('-' + case.provider)}",
        provider=lambda: PROVIDER_FNS[case.provider],
        gate=gate,
        prepare=prepare,
        columns=lambda timing: dict(bytes_moved=bytes_moved(case.shape),
                                    copy_bandwidth=session.copy_bandwidth),
        time_kwargs=dict(cpu_repeats=3 if slow else 5, **budget),
        few_rounds=slow,
    )


def test_gae(case: Case, bench_session: Any, benchmark: Any) -> None:
    row, outcome = run_case(case, bench_session, benchmark)
    bench_session.add(row)
    harness.report_outcome(row, outcome, case.provider)
