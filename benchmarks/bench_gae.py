"""Benchmark of the ops of kernels/gae.py against what trainers write instead:
`rlhf_fast.gae`, `rlhf_fast.masked_whiten` and `rlhf_fast.group_advantages`.

Inputs: fp32 rewards and values ``[B, T]`` and a right-padded bool mask (each row a
prefix of valid tokens, one row full), gamma 1.0, lam 0.95, no bootstrap value;
``masked_whiten`` whitens those values under that mask; ``group_advantages`` takes fp32
scores ``[B]`` in groups of ``GROUP_SIZE`` (8). Forward only: these ops run under
no_grad in a trainer. The rows of the last two ops carry the op's name as their variant
(``gae (masked_whiten)`` in the table), so the three land in one ``gae`` result.

GAE providers (same inputs, same process):

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

``masked_whiten`` providers, at the GAE shapes:

* ``rlhf_fast``: ``rlhf_fast.masked_whiten(x, mask)``: unbiased (n - 1) variance, 0 at
  masked positions.
* ``eager``: TRL's ``masked_whiten``: ``masked_mean`` (sum(x * mask) / sum(mask)),
  ``masked_var`` with its n / (n - 1) correction (without its two checks of the mask
  count, host syncs), ``(x - mean) * rsqrt(var + 1e-8)``, then times the mask, so that
  padding is 0 as in ours (TRL's PPO trainer zeroes it after the call).
* ``compile``: ``torch.compile`` of ``eager`` (GPU only, like GAE's).

``group_advantages`` providers, B in {512, 8192} (quick: {64, 200}):

* ``rlhf_fast``: ``rlhf_fast.group_advantages(scores, group_size)``.
* ``eager``: TRL's GRPOTrainer: ``scores.view(-1, G)`` ``.mean(1)`` and ``.std(1)``
  (unbiased), each ``repeat_interleave(G)``, ``(scores - mean) / (std + eps)``; eps is
  rlhf_fast's default 1e-6 (TRL adds 1e-4), so that the gate compares like with like.
* ``compile``: ``torch.compile`` of ``eager`` (GPU only).

Every provider is first checked against ``rlhf_fast.reference`` (``gae``,
``masked_whiten``, ``group_advantages``) in float64 on the same inputs (relative error
<= 1e-5; for GAE advantages and returns); one that does not match is reported "wrong"
and not timed.

Bytes-moved floor (GB/s column), with N = B * T:

* GAE: read rewards and values (fp32) and the bool mask, write advantages and returns
  (fp32): 4 N + 4 N + N + 4 N + 4 N = 17 N bytes.
* masked_whiten: read x (fp32) and the mask, write the output (fp32): 4 N + N + 4 N =
  9 N. The minimum: rlhf_fast's kernel reads x and the mask twice (statistics pass, then
  output pass), up to 14 N, and is measured against 9 N all the same.
* group_advantages: read the scores, write the advantages (fp32): 8 B bytes.
"""

from __future__ import annotations

import dataclasses
import math
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

WHITEN = "masked_whiten"
#: Added to the variance: TRL's, and rlhf_fast.masked_whiten's default.
WHITEN_EPS = 1e-8
GROUP = "group_advantages"
GROUP_GPU_SHAPES = [(512,), (8192,)]
GROUP_QUICK_SHAPES = [(64,), (200,)]
GROUP_SIZE = 8
#: Added to the std: rlhf_fast.group_advantages' default (TRL's GRPOTrainer adds 1e-4).
GROUP_EPS = 1e-6

Outputs = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: shape, provider and op ("" for GAE, else WHITEN or GROUP)."""

    shape: tuple[int, ...]
    provider: str
    variant: str = ""

    @property
    def id(self) -> str:
        variant = f"-{self.variant}" if self.variant else ""
        return f"{'x'.join(map(str, self.shape))}-fp32{variant}-{MODE}-{self.provider}"


def cases(quick: bool) -> list[Case]:
    """All cases, in table order: op, shape, provider."""
    shapes = QUICK_SHAPES if quick else GPU_SHAPES
    group_shapes = GROUP_QUICK_SHAPES if quick else GROUP_GPU_SHAPES
    return [
        Case(shape, provider, variant)
        for variant, op in OPS.items()
        for shape in (group_shapes if variant == GROUP else shapes)
        for provider in op.fns
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


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's masked_mean: sum(x * mask) / sum(mask)."""
    return (x * mask).sum() / mask.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's masked_var(unbiased=True), without its checks of sum(mask) (host syncs)."""
    centered = x - masked_mean(x, mask)
    count = mask.sum()
    return masked_mean(centered**2, mask) * (count / (count - 1))


def eager_masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's masked_whiten, then times the mask: 0 at padded positions, as ours."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + WHITEN_EPS) * mask


def rlhf_fast_masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return rlhf_fast.masked_whiten(x, mask, eps=WHITEN_EPS)


def compiled_masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return harness.compiled(eager_masked_whiten)(x, mask)


def eager_group_advantages(scores: torch.Tensor) -> torch.Tensor:
    """GRPO advantages as TRL's GRPOTrainer computes them (with our eps)."""
    grouped = scores.view(-1, GROUP_SIZE)
    mean = grouped.mean(dim=1).repeat_interleave(GROUP_SIZE, dim=0)
    std = grouped.std(dim=1).repeat_interleave(GROUP_SIZE, dim=0)
    return (scores - mean) / (std + GROUP_EPS)


def rlhf_fast_group_advantages(scores: torch.Tensor) -> torch.Tensor:
    return rlhf_fast.group_advantages(scores, GROUP_SIZE, eps=GROUP_EPS)


def compiled_group_advantages(scores: torch.Tensor) -> torch.Tensor:
    return harness.compiled(eager_group_advantages)(scores)


WHITEN_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "rlhf_fast": rlhf_fast_masked_whiten,
    "eager": eager_masked_whiten,
    "compile": compiled_masked_whiten,
}
GROUP_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "rlhf_fast": rlhf_fast_group_advantages,
    "eager": eager_group_advantages,
    "compile": compiled_group_advantages,
}


# --------------------------------------------------------------------------- inputs


def make_inputs(shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """``[B, T]``: random fp32 rewards and values; right-padded bool mask with lengths in
    [T/4, T]. ``[B]``: random fp32 scores."""
    gen = torch.Generator(device=device).manual_seed(1234)
    if len(shape) == 1:
        return {"scores": torch.randn(shape, generator=gen, device=device, dtype=DTYPE)}
    b, t = shape
    rewards = torch.randn(shape, generator=gen, device=device, dtype=DTYPE) * 0.1
    values = torch.randn(shape, generator=gen, device=device, dtype=DTYPE)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen, device=device)
    lengths[0] = t  # one full row
    mask = torch.arange(t, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    return {"rewards": rewards, "values": values, "mask": mask}


def bytes_moved(shape: tuple[int, ...], variant: str = "") -> int:
    """The floor, N elements of `shape` (module docstring): GAE 17 N, masked_whiten 9 N,
    group_advantages 8 N."""
    return OPS[variant].bytes_per_element * math.prod(shape)


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


def _gate_whiten(
    inp: dict[str, torch.Tensor], fn: Callable[..., torch.Tensor]
) -> tuple[bool, dict[str, float]]:
    """Run the provider once on (values, mask); compare with the float64 reference."""
    ref = reference.masked_whiten(inp["values"].double(), inp["mask"], eps=WHITEN_EPS)
    ok, error = harness.check_close(fn(inp["values"], inp["mask"]), ref, TOLERANCE)
    return ok, {"whitened": error}


def _gate_group(
    inp: dict[str, torch.Tensor], fn: Callable[..., torch.Tensor]
) -> tuple[bool, dict[str, float]]:
    """Run the provider once on the scores; compare with the float64 reference."""
    ref = reference.group_advantages(inp["scores"].double(), GROUP_SIZE, eps=GROUP_EPS)
    ok, error = harness.check_close(fn(inp["scores"]), ref, TOLERANCE)
    return ok, {"advantages": error}


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of the suite: its providers, its gate, the inputs (`make_inputs` keys) its
    providers take and its bytes-moved floor per element."""

    fns: dict[str, Callable[..., Any]]
    gate: Callable[[dict[str, torch.Tensor], Callable[..., Any]], tuple[bool, dict[str, float]]]
    args: tuple[str, ...]
    bytes_per_element: int


#: The ops by Case.variant ("" is GAE), in table order.
OPS = {
    "": Op(PROVIDER_FNS, _gate, ("rewards", "values", "mask"), 4 + 4 + 1 + 4 + 4),
    WHITEN: Op(WHITEN_FNS, _gate_whiten, ("values", "mask"), 4 + 1 + 4),
    GROUP: Op(GROUP_FNS, _gate_group, ("scores",), 4 + 4),
}


def run_case(case: Case, session: Any, benchmark: Any) -> tuple[dict[str, Any], str | None]:
    """Gate and time one case. Returns its row and the pytest outcome to raise (or None)."""
    device = session.device
    row_args = dict(op=OP, shape=case.shape, dtype=DTYPE, provider=case.provider, mode=MODE)
    if case.variant:
        row_args["variant"] = case.variant
    name = case.variant or OP
    if case.provider in ("compile", "compile-step") and device.type != "cuda":
        reason = "torch.compile skipped in CPU quick mode"
        return harness.make_row(status=harness.status_skipped(reason), **row_args), "skip"
    if case.provider == "compile" and not case.variant and case.shape[1] > COMPILE_MAX_T:
        reason = f"compiling the loop unrolled over T > {COMPILE_MAX_T} steps takes too long"
        return harness.make_row(status=harness.status_skipped(reason), **row_args), "skip"
    if case.provider == "rlhf_fast" and not callable(getattr(rlhf_fast, name, None)):
        reason = f"rlhf_fast.{name} not available"
        return harness.make_row(status=harness.status_skipped(reason), **row_args), "skip"

    op = OPS[case.variant]
    inp = make_inputs(case.shape, device)
    args = [inp[key] for key in op.args]

    def gate(fn: Callable[..., Any]) -> tuple[bool, dict[str, float]]:
        with torch.no_grad():
            return op.gate(inp, fn)

    def prepare(fn: Callable[..., Any]) -> tuple[Callable[[], Any], None]:
        def timed() -> Any:
            with torch.no_grad():
                return fn(*args)

        return timed, None

    slow = case.provider in ("python-loop", "compile-step")
    budget = dict(warmup_ms=LOOP_WARMUP_MS, rep_ms=LOOP_REP_MS) if slow else {}
    return harness.gate_and_time(
        benchmark=benchmark, device=device, row_args=row_args,
        group=f"{OP} {case.id.removesuffix('-' + case.provider)}",
        provider=lambda: op.fns[case.provider],
        gate=gate,
        prepare=prepare,
        columns=lambda timing: dict(bytes_moved=bytes_moved(case.shape, case.variant),
                                    copy_bandwidth=session.copy_bandwidth),
        time_kwargs=dict(cpu_repeats=3 if slow else 5, **budget),
        few_rounds=slow,
    )


def test_gae(case: Case, bench_session: Any, benchmark: Any) -> None:
    row, outcome = run_case(case, bench_session, benchmark)
    bench_session.add(row)
    harness.report_outcome(row, outcome, case.provider)
