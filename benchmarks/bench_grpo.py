"""Benchmark of the GRPO policy loss from the logits of a batch of sampled completions.

The objective, as TRL's GRPOTrainer and DAPO use it: per token, the clipped surrogate
with clip-higher (ratio clipped to [1 - 0.2, 1 + 0.28]) on a per-sequence advantage, plus
beta = 0.04 times the k3 KL to a reference policy, averaged over every valid token of
the batch (TRL's ``bnpo`` / DAPO aggregation). Inputs: logits ``[B, T + 1, V]`` bf16 (the
completion positions plus the last one, which predicts nothing: TRL keeps
``logits_to_keep + 1`` and drops it), completion ids ``[B, T]``, a right-padded bool
completion mask, old-policy and reference per-token log-probs ``[B, T]`` fp32 (within
~0.2-0.3 nats of the policy's, so ratios clip at both bounds) and advantages ``[B]``
fp32 of alternating sign.

Providers (same inputs, same process):

* ``rlhf_fast``: ``logp = rlhf_fast.logprobs(logits[:, :-1], ids)`` (a strided view, read
  in place), then ``rlhf_fast.ppo_loss(logp, old_logp, advantages[:, None], mask,
  clip_eps=0.2, clip_eps_high=0.28, ref_logp=ref_logp, kl_coef=0.04,
  kl_estimator="k3", agg="token-mean").loss``.
* ``rlhf_fast-inplace``: the same with ``logprobs(..., inplace_backward=True)``
  (backward modes only). Its backward overwrites the logits: a fresh copy per timed call.
* ``liger``: Liger-Kernel's ``triton_grpo_loss(logits, old_logp, ref_logp, ids,
  advantages, mask, temperature=1, beta=0.04, eps_low=0.2, eps_high=0.28,
  loss_type="bnpo", reduce=True)`` (its default ``inplace=True`` writes the gradient into
  the logits: a fresh copy per timed call, in every mode, as for the in-place provider).
  Runs on CUDA, or under TRITON_INTERPRET=1; skipped, with the reason, where missing.
* ``eager``: as TRL-style trainers write it: ``logits[:, :-1].float().log_softmax(-1)``,
  ``gather``, then the loss term by term (``exp``, ``clamp``, ``min``, masked mean).
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Modes: ``fwd`` (logits not requiring grad: the loss only), ``bwd`` (the backward alone;
the forward building its graph runs untimed before each call: for Liger, whose forward
computes the gradient, that leaves little) and ``fwd+bwd`` (``torch.autograd.grad`` of
the loss w.r.t. the whole ``[B, T + 1, V]`` logits).

Every provider is first checked against the float64 reference (``reference.logprobs``
chunk by chunk, never a float64 copy of the logits, then ``reference.ppo_loss``): the
loss, and in the backward modes the logits gradient on every sequence where there are at most
``GATE_GRAD_SEQS`` (4), else on the first two and last two, the last position (gradient
0) included. Relative error <= 1e-2 (bf16 logits). A provider that does not match is
reported "wrong" and not timed; one that runs out of GPU memory is reported as skipped.

Bytes-moved floor (GB/s column), as in the logprobs suite, with N = B T the predicting
rows: ``fwd`` reads the bf16 logits once, 2 N V bytes; ``bwd`` reads them once and
writes the bf16 gradient once, 4 N V; ``fwd+bwd`` both, 6 N V bytes. The O(N)
per-token tensors are not counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import harness

OP = "grpo"
DTYPE = torch.bfloat16
#: (completions B, completion tokens T, vocab V); the logits are [B, T + 1, V]. GPU: 8
#: completions of a Qwen-vocab policy (T = 4096 is 10 GB of logits).
GPU_SHAPES = [(8, 1024, 151936), (8, 4096, 151936)]
QUICK_SHAPES = [(2, 16, 64), (4, 100, 4099)]
PROVIDERS = ("rlhf_fast", "rlhf_fast-inplace", "liger", "eager", "compile")
MODES = ("fwd", "bwd", "fwd+bwd")
#: Providers that write into the logits: a fresh copy, made untimed, before every call.
OVERWRITE_LOGITS = ("rlhf_fast-inplace", "liger")
LIGER_ENTRY = ("liger", "liger_kernel.transformers.grpo_loss", "triton_grpo_loss")
TOLERANCE = 1e-2
GATE_GRAD_SEQS = 4

CLIP_LOW = 0.2
CLIP_HIGH = 0.28
BETA = 0.04
#: Std (nats) of old-policy and reference log-probs around the policy's: ~25% of the
#: ratios fall outside [0.8, 1.28], so both clip bounds and the min are exercised.
OLD_LOGP_STD = 0.2
REF_LOGP_STD = 0.3
#: No log-ratio lies within this many nats of a clip bound: the loss's gradient jumps
#: there, and a provider that rounds logits to bf16 (logp off by ~0.01) must not flip a
#: token across it and fail the gate for a discontinuity rather than an error.
CLIP_EDGE_MARGIN = 0.05


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: shape (B, T, V), mode and provider."""

    shape: tuple[int, int, int]
    mode: str
    provider: str

    @property
    def logits_shape(self) -> tuple[int, int, int]:
        b, t, v = self.shape
        return (b, t + 1, v)

    @property
    def id(self) -> str:
        b, t, v = self.logits_shape
        return f"{b}x{t}x{v}-bf16-{self.mode}-{self.provider}"


def cases(quick: bool) -> list[Case]:
    """All cases, in table order: shape, mode, provider."""
    return [
        Case(shape, mode, provider)
        for shape in (QUICK_SHAPES if quick else GPU_SHAPES)
        for mode in MODES
        for provider in PROVIDERS
        if not (provider == "rlhf_fast-inplace" and mode == "fwd")  # same forward
    ]


# --------------------------------------------------------------------------- providers

#: Every provider's signature: (logits [B, T+1, V], ids, mask, old_logp, ref_logp,
#: advantages [B]) -> scalar loss.
LossFn = Callable[..., torch.Tensor]


def _rlhf_fast(inplace: bool) -> LossFn:
    def run(
        logits: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        old_logp: torch.Tensor,
        ref_logp: torch.Tensor,
        advantages: torch.Tensor,
    ) -> torch.Tensor:
        logp = rlhf_fast.logprobs(logits[:, :-1], ids, inplace_backward=inplace)
        return grpo_objective(rlhf_fast.ppo_loss, logp, mask, old_logp, ref_logp, advantages)

    return run


def grpo_objective(
    ppo_loss: Callable[..., Any],
    logp: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
) -> torch.Tensor:
    """The benchmark's objective through `ppo_loss` (rlhf_fast's, or the reference)."""
    return ppo_loss(
        logp,
        old_logp,
        advantages.unsqueeze(1).expand_as(logp),
        mask,
        clip_eps=CLIP_LOW,
        clip_eps_high=CLIP_HIGH,
        ref_logp=ref_logp,
        kl_coef=BETA,
        kl_estimator="k3",
        agg="token-mean",
    ).loss


def liger_grpo_loss(triton_grpo_loss: Any) -> LossFn:
    """Liger-Kernel's fused GRPO loss from logits, reduced over the valid tokens."""

    def run(
        logits: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        old_logp: torch.Tensor,
        ref_logp: torch.Tensor,
        advantages: torch.Tensor,
    ) -> torch.Tensor:
        loss, _metrics = triton_grpo_loss(
            logits, old_logp, ref_logp, ids, advantages, mask,
            temperature=1.0, beta=BETA, eps_low=CLIP_LOW, eps_high=CLIP_HIGH,
            loss_type="bnpo", reduce=True,
        )
        return loss

    return run


def eager_token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """TRL-style per-token log-probs: fp32 log_softmax of `logits` ``[B, T, V]`` (aligned
    with `ids`), gather."""
    return logits.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def eager_grpo_objective(
    logp: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
) -> torch.Tensor:
    """The loss term by term, as TRL's GRPOTrainer writes it (``bnpo`` aggregation)."""
    per_token_kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    coef_1 = torch.exp(logp - old_logp)
    coef_2 = torch.clamp(coef_1, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    adv = advantages.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv) + BETA * per_token_kl
    m = mask.to(per_token_loss.dtype)
    return (per_token_loss * m).sum() / m.sum().clamp(min=1.0)


def eager_grpo_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
) -> torch.Tensor:
    """The GRPO loss from logits ``[B, T + 1, V]`` as TRL-style trainers write it."""
    logp = eager_token_logps(logits[:, :-1], ids)
    return eager_grpo_objective(logp, mask, old_logp, ref_logp, advantages)


def _eager_fwd(*args: torch.Tensor) -> torch.Tensor:
    return eager_grpo_loss(*args)


def _eager_fwd_bwd(*args: torch.Tensor) -> torch.Tensor:
    return eager_grpo_loss(*args)


def compiled_grpo_loss(mode: str) -> LossFn:
    """``torch.compile`` of ``eager``, one function per mode: each sees the GPU shapes only
    (dynamo's per-function graph limit, see ``harness.compiled``)."""
    return harness.compiled(_eager_fwd if mode == "fwd" else _eager_fwd_bwd)


def provider_fn(provider: str, mode: str, device: torch.device) -> LossFn:
    if provider == "rlhf_fast":
        return _rlhf_fast(inplace=False)
    if provider == "rlhf_fast-inplace":
        return _rlhf_fast(inplace=True)
    if provider == "eager":
        return eager_grpo_loss
    if provider == "compile":
        return compiled_grpo_loss(mode)
    entry = harness.require_peer(*LIGER_ENTRY, device)
    return liger_grpo_loss(entry)


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why `provider` cannot run on `device` (None when it can)."""
    if provider == "compile" and device.type != "cuda":
        return "torch.compile skipped in CPU quick mode"
    if provider == "liger":
        return harness.peer_entry(*LIGER_ENTRY, device)[1]
    return None


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """One case's tensors. ``logits`` is never written: overwriting providers get copies."""

    logits: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    advantages: torch.Tensor
    #: float64 reference per-token log-probs of the policy, ``[B, T]`` (for the gate).
    logp64: torch.Tensor

    def args(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A provider's arguments, with `logits` in place of the case's."""
        return (logits, self.ids, self.mask, self.old_logp, self.ref_logp, self.advantages)


def reference_token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float64 ``[B, T]`` reference log-probs of `ids`, chunk by chunk."""
    out = torch.zeros(ids.shape, dtype=torch.float64, device=ids.device)
    with torch.no_grad():
        for seq in range(ids.shape[0]):
            for start, stop, _, tok in harness.reference_logprob_chunks(
                logits, ids, seq, grad=False
            ):
                out[seq, start:stop] = tok
    return out


def policy_neighbours(
    logp64: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 old-policy and reference log-probs near the policy's float64 `logp64`: noise
    of std OLD_LOGP_STD / REF_LOGP_STD, the log-ratios kept CLIP_EDGE_MARGIN away from
    both clip bounds (pushed to the near side of the band)."""

    def noise(std: float) -> torch.Tensor:
        return std * torch.randn(
            logp64.shape, generator=gen, device=logp64.device, dtype=torch.float64
        )

    log_ratio = noise(OLD_LOGP_STD)  # logp - old_logp
    for edge in (math.log(1 - CLIP_LOW), math.log(1 + CLIP_HIGH)):
        side = torch.where(log_ratio >= edge, 1.0, -1.0).to(log_ratio.dtype)
        near = (log_ratio - edge).abs() < CLIP_EDGE_MARGIN
        log_ratio = torch.where(near, edge + side * CLIP_EDGE_MARGIN, log_ratio)
    return (logp64 - log_ratio).float(), (logp64 + noise(REF_LOGP_STD)).float()


def advantages(b: int, gen: torch.Generator) -> torch.Tensor:
    """``[B]`` fp32 advantages of alternating sign: group-normalised advantages have both
    signs, and each sign makes a different clip bound bite."""
    signs = torch.tensor([1.0, -1.0], device=gen.device).repeat((b + 1) // 2)[:b]
    return torch.randn(b, generator=gen, device=gen.device).abs() * signs


#: The policy's float64 reference token log-probs per (shape, device): one chunked float64
#: pass over the logits per shape, not per provider (the inputs are seeded).
_logp64: dict[tuple[tuple[int, int, int], str], torch.Tensor] = {}


def make_inputs(shape: tuple[int, int, int], device: torch.device) -> Inputs:
    """Random logits (std 2, one sequence at a time: no fp32 copy of the whole tensor),
    right-padded completions (one full-length), old / reference log-probs near the
    policy's and advantages of alternating sign."""
    b, t, v = shape
    gen = torch.Generator(device=device).manual_seed(1234)
    logits = torch.empty((b, t + 1, v), device=device, dtype=DTYPE)
    for seq in range(b):
        noise = torch.randn((t + 1, v), generator=gen, device=device, dtype=torch.float32)
        logits[seq].copy_(noise.mul_(2.0))
        del noise
    ids = torch.randint(0, v, (b, t), generator=gen, device=device)
    lengths = torch.randint(max(1, t // 4), t + 1, (b,), generator=gen, device=device)
    lengths[0] = t
    mask = torch.arange(t, device=device).unsqueeze(0) < lengths.unsqueeze(1)

    key = (shape, str(device))
    if key not in _logp64:
        _logp64[key] = reference_token_logps(logits, ids)
    logp64 = _logp64[key]
    old_logp, ref_logp = policy_neighbours(logp64, gen)
    return Inputs(logits, ids, mask, old_logp, ref_logp, advantages(b, gen), logp64)


def bytes_moved(case: Case) -> int:
    """The bf16 logits[:, :-1] read once (fwd, 2 N V), read + grad written (bwd, 4 N V),
    both (fwd+bwd, 6 N V)."""
    b, t, v = case.shape
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[case.mode]
    return passes * b * t * v * torch.empty((), dtype=DTYPE).element_size()


# --------------------------------------------------------------------------- one case


def _gate_seqs(rows: int) -> list[int]:
    """Sequences whose gradient is compared: all, or the first two and the last two."""
    if rows <= GATE_GRAD_SEQS:
        return list(range(rows))
    return [0, 1, rows - 2, rows - 1]


def _grad_error(grad: torch.Tensor, inp: Inputs, g_tok: torch.Tensor) -> tuple[bool, float]:
    """``harness.check_close`` of the logits gradient on the gated sequences, accumulated
    chunk by chunk against the float64 reference (d loss / d logp times d logp / d logits)."""
    diff2 = ref2 = 0.0
    for seq in _gate_seqs(inp.logits.shape[0]):
        for start, stop, x, tok in harness.reference_logprob_chunks(
            inp.logits, inp.ids, seq, grad=True
        ):
            (ref_grad,) = torch.autograd.grad(tok, x, g_tok[seq, start:stop])
            out = grad[seq, start:stop].to(torch.float64)
            diff2 += float((out - ref_grad).square().sum())
            ref2 += float(ref_grad.square().sum())
        diff2 += float(grad[seq, -1].to(torch.float64).square().sum())  # predicts nothing
    diff, scale = math.sqrt(diff2), math.sqrt(ref2)
    err = diff / scale if scale > 0 else diff
    return bool(err <= TOLERANCE), err


def _gate(case: Case, inp: Inputs, fn: LossFn) -> tuple[bool, dict[str, float]]:
    """Run the provider once; compare the loss (and logits grad) with the float64 reference."""
    backward = case.mode != "fwd"
    logp64 = inp.logp64.detach().clone().requires_grad_(backward)
    ref_loss = grpo_objective(
        reference.ppo_loss, logp64, inp.mask, inp.old_logp.double(), inp.ref_logp.double(),
        inp.advantages.double(),
    )
    x = inp.logits.detach().requires_grad_(backward)
    if case.provider in OVERWRITE_LOGITS:
        # a copy as an op's output (not a view of a leaf, which inplace_backward refuses);
        # autograd.grad w.r.t. x stops at x
        x = x.clone()
    loss = fn(*inp.args(x))
    errors: dict[str, float] = {}
    ok, errors["loss"] = harness.check_close(loss, ref_loss, TOLERANCE)
    if backward:
        (grad,) = torch.autograd.grad(loss, x)
        del x, loss  # an overwriting provider's copy now holds its gradient
        (g_tok,) = torch.autograd.grad(ref_loss, logp64)
        good, errors["grad"] = _grad_error(grad, inp, g_tok)
        ok &= good
    return ok, errors


def _timed(
    case: Case, inp: Inputs, fn: LossFn
) -> tuple[Callable[..., Any], Callable[[], Any] | None]:
    """The timed call and its untimed per-call setup (or None) for the case's mode."""
    backward = case.mode != "fwd"
    fresh = case.provider in OVERWRITE_LOGITS
    leaf = None if fresh else inp.logits.detach().requires_grad_(backward)

    def new_leaf() -> torch.Tensor:  # the fresh copy is not a leaf: see _gate
        return inp.logits.detach().requires_grad_(backward).clone() if fresh else leaf

    if case.mode == "bwd":  # the forward building the graph runs untimed before each call

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            x = new_leaf()
            return fn(*inp.args(x)), x

        return (lambda state: torch.autograd.grad(*state)), forward

    def call(x: torch.Tensor) -> Any:
        loss = fn(*inp.args(x))
        return torch.autograd.grad(loss, x) if backward else loss

    if fresh:
        return call, new_leaf
    return (lambda: call(leaf)), None


def run_case(case: Case, session: Any, benchmark: Any) -> tuple[dict[str, Any], str | None]:
    """Gate and time one case. Returns its row and the pytest outcome to raise (or None).

    All tensors live in this frame, so they are freed before the caller raises a
    skip / xfail / fail (whose traceback would otherwise keep gigabytes alive).
    """
    device = session.device
    row_args = dict(
        op=OP, shape=case.logits_shape, dtype=DTYPE, provider=case.provider, mode=case.mode
    )
    reason = unavailable(case.provider, device)
    if reason is not None:
        return harness.make_row(status=harness.status_skipped(reason), **row_args), "skip"

    inp = make_inputs(case.shape, device)
    row_args["answer_tokens"] = int(inp.mask.sum())
    return harness.gate_and_time(
        benchmark=benchmark, device=device, row_args=row_args,
        group=f"{OP} {case.id.removesuffix('-' + case.provider)}",
        provider=lambda: provider_fn(case.provider, case.mode, device),
        gate=lambda fn: _gate(case, inp, fn),
        prepare=lambda fn: _timed(case, inp, fn),
        columns=lambda timing: dict(bytes_moved=bytes_moved(case),
                                    copy_bandwidth=session.copy_bandwidth),
    )


def test_grpo(case: Case, bench_session: Any, benchmark: Any) -> None:
    row, outcome = run_case(case, bench_session, benchmark)
    bench_session.add(row)
    harness.report_outcome(row, outcome, case.provider)
