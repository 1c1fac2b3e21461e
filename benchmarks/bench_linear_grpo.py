"""Benchmark of the GRPO policy loss straight from hidden states: `rlhf_fast.linear_ppo_loss`.

The objective of the ``grpo`` suite (clip-higher [1 - 0.2, 1 + 0.28] on a per-sequence
advantage, beta = 0.04 times the k3 KL to precomputed reference log-probs, mean over the
valid tokens of the batch), but from the policy's last hidden states ``[B, T, D]`` bf16
and its lm_head ``[V, D]`` bf16 instead of logits: the ``[B T, V]`` logits need never
exist. Completion ids ``[B, T]``, a right-padded bool mask, old-policy and reference
log-probs ``[B, T]`` fp32 near the policy's (so ratios clip at both bounds), advantages
``[B]`` of alternating sign.

Providers (same inputs, same process):

* ``rlhf_fast``: ``rlhf_fast.linear_ppo_loss(hidden, weight, ids, old_logp,
  advantages[:, None], mask, clip_eps=0.2, clip_eps_high=0.28, ref_logp=ref_logp,
  kl_coef=0.04, kl_estimator="k3", agg="token-mean").loss`` (gradients computed during
  the forward where the loss is token-wise: 3 GEMMs for fwd+bwd, 1 for fwd).
* ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss(beta=0.04, epsilon_low=0.2,
  epsilon_high=0.28, loss_type="bnpo", compiled=<on CUDA>)`` with the precomputed
  ``ref_per_token_logps`` (TRL's ``use_liger_loss`` path): chunks of sequences through
  ``torch.func``, the gradient computed in its forward even when nothing requires grad
  (3 GEMMs in both modes). Skipped, with the reason, where not installed.
* ``eager``: the ``grpo`` suite's eager loss on ``hidden @ weight.T`` (materialised bf16
  logits, fp32 log_softmax).
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Modes: ``fwd`` (nothing requires grad: the loss only) and ``fwd+bwd``
(``torch.autograd.grad`` of the loss w.r.t. hidden and weight).

No ``bwd`` mode: the fused providers split the work between forward and backward
differently (Liger and the fused losses compute gradients in the forward), so a
backward-alone time would compare different work; ``fwd+bwd`` is the comparable number.

Correctness gate, with the machinery of the ``linear_logprobs`` suite: the float64
per-token log-probs of every token (``reference.linear_logprobs``, a chunk of rows at a
time) give the float64 loss (``reference.ppo_loss``) and its gradient ``g`` w.r.t. each
token's log-prob; d hidden and d weight are then those of ``sum g * logp``, compared on
the linear_logprobs suite's row and vocab subsets. Relative error <= 2e-2. A provider
that does not match is reported "wrong" and not timed.

Roofline: FLOPs over the measured bf16 GEMM rate, as in the linear_logprobs suite, with
N = B T: ``floor_flops`` = (fwd 1, fwd+bwd 3) GEMMs of 2 N V D FLOPs; ``gemms`` is what
each provider runs (above; eager and compile: 1 and 3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import bench_grpo, bench_linear_logprobs, harness

OP = "linear_grpo"
DTYPE = torch.bfloat16
#: (B, T, D, V): 8 x 1024 completion tokens through a Llama-3-8B-sized lm_head, 16 x 1024
#: through a Qwen2-7B-width one with the Qwen vocab (the linear_logprobs suite's shapes).
GPU_SHAPES = [(8, 1024, 4096, 128256), (16, 1024, 3584, 151936)]
QUICK_SHAPES = [(2, 16, 16, 100), (4, 80, 64, 3000)]
PROVIDERS = ("rlhf_fast", "liger", "eager", "compile")
MODES = ("fwd", "fwd+bwd")
TOLERANCE = bench_linear_logprobs.TOLERANCE
LIGER_ENTRY = ("liger", "liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
#: GEMMs of 2 N V D FLOPs each provider runs, per mode; the floor is eager's.
GEMMS = {
    "rlhf_fast": {"fwd": 1, "fwd+bwd": 3},
    "liger": {"fwd": 3, "fwd+bwd": 3},
    "eager": {"fwd": 1, "fwd+bwd": 3},
    "compile": {"fwd": 1, "fwd+bwd": 3},
}
#: Token rows whose float64 log-probs are computed at once for the loss (~256 MiB).
REF_ROW_ELEMENTS = 2**25


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: shape (B, T, D, V), mode and provider."""

    shape: tuple[int, int, int, int]
    mode: str
    provider: str

    @property
    def id(self) -> str:
        b, t, d, v = self.shape
        return f"{b}x{t}x{d}x{v}-bf16-{self.mode}-{self.provider}"


def cases(quick: bool) -> list[Case]:
    """All cases, in table order: shape, mode, provider."""
    return [
        Case(shape, mode, provider)
        for shape in (QUICK_SHAPES if quick else GPU_SHAPES)
        for mode in MODES
        for provider in PROVIDERS
    ]


# --------------------------------------------------------------------------- providers

#: Every provider's signature: (hidden [B, T, D], weight [V, D], ids, mask, old_logp,
#: ref_logp, advantages [B]) -> scalar loss.
LossFn = Callable[..., torch.Tensor]


def rlhf_fast_linear_grpo(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
) -> torch.Tensor:
    return rlhf_fast.linear_ppo_loss(
        hidden,
        weight,
        ids,
        old_logp,
        advantages.unsqueeze(1).expand_as(old_logp),
        mask,
        clip_eps=bench_grpo.CLIP_LOW,
        clip_eps_high=bench_grpo.CLIP_HIGH,
        ref_logp=ref_logp,
        kl_coef=bench_grpo.BETA,
        kl_estimator="k3",
        agg="token-mean",
    ).loss


def eager_linear_grpo(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *rest: torch.Tensor,
) -> torch.Tensor:
    """The grpo suite's eager loss on materialised logits ``hidden @ weight.T``."""
    logp = bench_grpo.eager_token_logps(hidden @ weight.T, ids)
    return bench_grpo.eager_grpo_objective(logp, *rest)


def _eager_fwd(*args: torch.Tensor) -> torch.Tensor:
    return eager_linear_grpo(*args)


def _eager_fwd_bwd(*args: torch.Tensor) -> torch.Tensor:
    return eager_linear_grpo(*args)


def compiled_linear_grpo(mode: str) -> LossFn:
    """``torch.compile`` of ``eager``, one function per mode: each sees the GPU shapes only
    (dynamo's per-function graph limit, see ``harness.compiled``)."""
    return harness.compiled(_eager_fwd if mode == "fwd" else _eager_fwd_bwd)


def liger_linear_grpo(loss_cls: Any, device: torch.device) -> LossFn:
    """Liger-Kernel's chunked fused linear GRPO loss with precomputed reference log-probs."""
    loss_fn = loss_cls(
        beta=bench_grpo.BETA,
        epsilon_low=bench_grpo.CLIP_LOW,
        epsilon_high=bench_grpo.CLIP_HIGH,
        loss_type="bnpo",
        compiled=device.type == "cuda",
    )

    def run(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        old_logp: torch.Tensor,
        ref_logp: torch.Tensor,
        advantages: torch.Tensor,
    ) -> torch.Tensor:
        out = loss_fn(
            hidden, weight, ids, mask, advantages,
            ref_per_token_logps=ref_logp, old_per_token_logps=old_logp,
        )
        return out[0] if isinstance(out, tuple) else out  # (loss, metrics)

    return run


def provider_fn(provider: str, mode: str, device: torch.device) -> LossFn:
    if provider == "rlhf_fast":
        return rlhf_fast_linear_grpo
    if provider == "eager":
        return eager_linear_grpo
    if provider == "compile":
        return compiled_linear_grpo(mode)
    entry = harness.require_peer(*LIGER_ENTRY, device, runs=harness.Runs.ANY_DEVICE)
    return liger_linear_grpo(entry, device)


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why `provider` cannot run on `device` (None when it can)."""
    if provider == "compile" and device.type != "cuda":
        return "torch.compile skipped in CPU quick mode"
    if provider == "liger":
        return harness.peer_entry(*LIGER_ENTRY, device, runs=harness.Runs.ANY_DEVICE)[1]
    return None


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """One case's tensors (never written) and the float64 reference of the gate."""

    hidden: torch.Tensor
    weight: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    advantages: torch.Tensor
    loss64: torch.Tensor
    grads: bench_linear_logprobs.Reference

    def args(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (hidden, weight, self.ids, self.mask, self.old_logp, self.ref_logp,
                self.advantages)


def reference_token_logps(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor
                          ) -> torch.Tensor:
    """float64 log-probs of every token ``[B, T]``, a chunk of rows at a time."""
    h, flat_ids = hidden.flatten(0, 1), ids.flatten()
    out = torch.empty(flat_ids.shape, dtype=torch.float64, device=ids.device)
    step = max(1, REF_ROW_ELEMENTS // weight.shape[0])
    with torch.no_grad():
        w = weight.double()
        for start in range(0, h.shape[0], step):
            rows = slice(start, start + step)
            out[rows] = reference.linear_logprobs(h[rows].double(), w, flat_ids[rows])
    return out.view(ids.shape)


#: Per (shape, device): the float64 token log-probs and (loss64, grads). The inputs are
#: seeded, so every provider of a shape shares them.
_token_logps: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}
_references: dict[tuple[tuple[int, ...], str], tuple[torch.Tensor, Any]] = {}


def make_inputs(shape: tuple[int, int, int, int], device: torch.device) -> Inputs:
    """Seeded inputs (hidden / weight scaled as in the linear_logprobs suite) and their
    float64 reference (once per shape): the loss, and d hidden / d weight on the gate's
    subsets."""
    b, t, d, v = shape
    gen = torch.Generator(device=device).manual_seed(1234)
    hidden = torch.randn((b, t, d), generator=gen, device=device).to(DTYPE)
    weight = torch.randn((v, d), generator=gen, device=device)
    weight = weight.mul_(bench_linear_logprobs.LOGIT_STD / d**0.5).to(DTYPE)
    ids = torch.randint(0, v, (b, t), generator=gen, device=device)
    lengths = torch.randint(max(1, t // 4), t + 1, (b,), generator=gen, device=device)
    lengths[0] = t
    mask = torch.arange(t, device=device).unsqueeze(0) < lengths.unsqueeze(1)

    key = (shape, str(device))
    if key not in _token_logps:
        _token_logps[key] = reference_token_logps(hidden, weight, ids)
    logp64 = _token_logps[key]

    old_logp, ref_logp = bench_grpo.policy_neighbours(logp64, gen)
    advantages = bench_grpo.advantages(b, gen)

    if key not in _references:
        _references[key] = _reference(hidden, weight, ids, mask, old_logp, ref_logp,
                                      advantages, logp64)
    loss64, grads = _references[key]
    return Inputs(hidden, weight, ids, mask, old_logp, ref_logp, advantages, loss64, grads)


def _reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    logp64: torch.Tensor,
) -> tuple[torch.Tensor, bench_linear_logprobs.Reference]:
    """The float64 loss, and d hidden / d weight on the linear_logprobs gate's subsets."""
    logp64 = logp64.detach().requires_grad_(True)
    loss64 = bench_grpo.grpo_objective(
        reference.ppo_loss, logp64, mask, old_logp.double(), ref_logp.double(),
        advantages.double(),
    )
    (g_tok,) = torch.autograd.grad(loss64, logp64)
    # d loss / d (hidden, weight) = that of sum(g_tok * logp): the linear_logprobs gate's
    # reference with g_tok as the upstream gradient (masked tokens: g_tok = 0, ignored).
    flat = bench_linear_logprobs.Inputs(
        hidden.flatten(0, 1), weight,
        ids.masked_fill(~mask, bench_linear_logprobs.IGNORE_INDEX).flatten(), g_tok.flatten(),
    )
    return loss64.detach(), bench_linear_logprobs.compute_reference(flat)


# --------------------------------------------------------------------------- one case


def gate_loss_from_hidden(case: Any, inp: Any, fn: LossFn) -> tuple[bool, dict[str, float]]:
    """Run the provider once; compare the loss (and d hidden, d weight) with the reference.
    `inp` has ``hidden``, ``weight``, ``args(hidden, weight)``, ``loss64`` and ``grads``
    (this suite's Inputs, and the linear_dpo suite's)."""
    backward = case.mode != "fwd"
    hidden = inp.hidden.detach().requires_grad_(backward)
    weight = inp.weight.detach().requires_grad_(backward)
    loss = fn(*inp.args(hidden, weight))
    errors: dict[str, float] = {}
    ok, errors["loss"] = harness.check_close(loss, inp.loss64, TOLERANCE)
    if backward:
        d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
        ref = inp.grads
        good, errors["grad_hidden"] = harness.check_close(
            d_hidden.flatten(0, 1)[ref.rows], ref.grad_hidden, TOLERANCE
        )
        ok &= good
        good, errors["grad_weight"] = harness.check_close(
            d_weight[ref.vocab], ref.grad_weight, TOLERANCE
        )
        ok &= good
    return ok, errors


def timed_loss_from_hidden(case: Any, inp: Any, fn: LossFn) -> Callable[[], Any]:
    """The timed call of `case`'s mode (`inp` as for `gate_loss_from_hidden`)."""
    backward = case.mode != "fwd"
    hidden = inp.hidden.detach().requires_grad_(backward)
    weight = inp.weight.detach().requires_grad_(backward)
    args = inp.args(hidden, weight)
    if not backward:
        return lambda: fn(*args)
    return lambda: torch.autograd.grad(fn(*args), (hidden, weight))


def flop_columns(case: Case, median_ms: float, rate: float) -> dict[str, Any]:
    b, t, d, v = case.shape
    return harness.gemm_roofline_columns(
        gemms=GEMMS[case.provider][case.mode],
        floor_gemms=bench_linear_logprobs.FLOOR_GEMMS[case.mode],
        gemm_flops=2 * b * t * v * d, median_ms=median_ms, rate=rate,
    )


def run_case(case: Case, session: Any, benchmark: Any) -> tuple[dict[str, Any], str | None]:
    """Gate and time one case. Returns its row and the pytest outcome to raise (or None).

    All tensors live in this frame, so they are freed before the caller raises a
    skip / xfail / fail (whose traceback would otherwise keep gigabytes alive).
    """
    device = session.device
    row_args = dict(op=OP, shape=case.shape, dtype=DTYPE, provider=case.provider, mode=case.mode)
    reason = unavailable(case.provider, device)
    if reason is not None:
        return harness.make_row(status=harness.status_skipped(reason), **row_args), "skip"

    rate = harness.gemm_rate(str(device))  # before this case allocates its inputs
    inp = make_inputs(case.shape, device)
    return harness.gate_and_time(
        benchmark=benchmark, device=device, row_args=row_args,
        group=f"{OP} {case.id.removesuffix('-' + case.provider)}",
        provider=lambda: provider_fn(case.provider, case.mode, device),
        gate=lambda fn: gate_loss_from_hidden(case, inp, fn),
        prepare=lambda fn: (timed_loss_from_hidden(case, inp, fn), None),
        columns=lambda timing: flop_columns(case, timing["median_ms"], rate),
        time_kwargs=dict(warmup_ms=bench_linear_logprobs.WARMUP_MS,
                         rep_ms=bench_linear_logprobs.REP_MS),
    )


def test_linear_grpo(case: Case, bench_session: Any, benchmark: Any) -> None:
    row, outcome = run_case(case, bench_session, benchmark)
    bench_session.add(row)
    harness.report_outcome(row, outcome, case.provider)
