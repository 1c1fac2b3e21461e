"""Benchmark of the GRPO policy loss from the logits of a batch of sampled completions: a
workload (`rlhf_fast.logprobs` then `rlhf_fast.ppo_loss`), not one op.

The objective (`objectives`), as TRL's GRPOTrainer and DAPO use it: per token, the clipped surrogate
with clip-higher (ratio clipped to [1 - 0.2, 1 + 0.28]) on a per-sequence advantage, plus
beta = 0.04 times the k3 KL to a reference policy, averaged over every valid token of
the batch (TRL's ``bnpo`` / DAPO aggregation). Inputs: logits ``[B, T + 1, V]`` bf16 (the
completion positions plus the last one, which predicts nothing: TRL keeps
``logits_to_keep + 1`` and drops it), completion ids ``[B, T]``, a right-padded bool
completion mask, old-policy and reference per-token log-probs ``[B, T]`` fp32 (within
~0.2-0.3 nats of the policy's, so ratios clip at both bounds) and advantages ``[B]``
fp32 of alternating sign.

Providers (same inputs, same process):

* ``rlhf_fast``: ``logp = rlhf_fast.logprobs(logits, F.pad(ids, (0, 1), value=-100))
  [:, :-1]`` (the ids shifted onto the whole logits, the last position ignored: the kernel
  writes the logits' gradient whole, with no slice backward), then
  ``rlhf_fast.ppo_loss(logp, old_logp, advantages[:, None], mask, clip_eps=0.2,
  clip_eps_high=0.28, ref_logp=ref_logp, kl_coef=0.04, kl_estimator="k3",
  agg="token-mean").loss``.
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
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import cases, gates, objectives, peers
from rlhf_fast.benchmarks.cases import Case
from rlhf_fast.benchmarks.inputs import random_logits, right_padded_mask
from rlhf_fast.benchmarks.objectives import CLIP_HIGH, CLIP_LOW, GRPO_BETA

OP = "grpo"
DTYPE = torch.bfloat16
#: (completions B, completion tokens T, vocab V); the logits are [B, T + 1, V]. GPU: 8
#: completions of a Qwen-vocab policy (T = 4096 is 10 GB of logits).
GPU_SHAPES = [(8, 1024, 151936), (8, 4096, 151936)]
QUICK_SHAPES = [(2, 16, 64), (4, 100, 4099)]
MODES = tuple(cases.LOGITS_PASSES)
#: Providers that write into the logits: a fresh copy, made untimed, before every call.
OVERWRITE_LOGITS = ("rlhf_fast-inplace", "liger")
LIGER = peers.Entry("liger", "liger_kernel.transformers.grpo_loss", "triton_grpo_loss")
TOLERANCE = 1e-2
GATE_GRAD_SEQS = 4


def logits_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The logits' shape ``[B, T + 1, V]`` of the size (B, T, V)."""
    b, t, v = shape
    return (b, t + 1, v)


# --------------------------------------------------------------------------- providers

#: Every provider's signature: (logits [B, T+1, V], ids, mask, old_logp, ref_logp,
#: advantages [B]) -> scalar loss.
LossFn = Callable[..., torch.Tensor]


def _rlhf_fast(inplace: bool) -> LossFn:
    def run(logits: torch.Tensor, ids: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        # ids shifted onto the whole logits (the last position ignored): no slice
        # backward, the kernel writes the logits' gradient whole
        logp = rlhf_fast.logprobs(logits, F.pad(ids, (0, 1), value=-100),
                                  inplace_backward=inplace)[:, :-1]
        return objectives.grpo_objective(rlhf_fast.ppo_loss, logp, *rest)

    return run


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
            temperature=1.0, beta=GRPO_BETA, eps_low=CLIP_LOW, eps_high=CLIP_HIGH,
            loss_type="bnpo", reduce=True,
        )
        return loss

    return run


def eager_grpo_loss(logits: torch.Tensor, ids: torch.Tensor, *rest: torch.Tensor
                    ) -> torch.Tensor:
    """The GRPO loss from logits ``[B, T + 1, V]`` as TRL-style trainers write it."""
    logp = objectives.eager_token_logps(logits[:, :-1], ids)
    return objectives.eager_grpo_objective(logp, *rest)


PROVIDERS = {
    "rlhf_fast": _rlhf_fast(inplace=False),
    "rlhf_fast-inplace": _rlhf_fast(inplace=True),
    "liger": cases.peer(liger_grpo_loss, LIGER),
    **cases.eager_and_compiled(eager_grpo_loss),
}


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


#: The policy's float64 reference token log-probs per (shape, device): one chunked float64
#: pass over the logits per shape, not per provider (the inputs are seeded).
_logp64: dict[tuple[tuple[int, int, int], str], torch.Tensor] = {}


def make_inputs(shape: tuple[int, int, int], device: torch.device) -> Inputs:
    """Random logits (std 2, one sequence at a time: no fp32 copy of the whole tensor),
    right-padded completions (one full-length), old / reference log-probs near the
    policy's and advantages of alternating sign."""
    b, t, v = shape
    gen = torch.Generator(device=device).manual_seed(1234)
    logits = random_logits(logits_shape(shape), DTYPE, gen)
    ids = torch.randint(0, v, (b, t), generator=gen, device=device)
    mask = right_padded_mask(b, t, gen)

    key = (shape, str(device))
    if key not in _logp64:
        _logp64[key] = gates.reference_token_logps(logits, ids)
    logp64 = _logp64[key]
    old_logp, ref_logp = objectives.policy_neighbours(logp64, gen)
    advantages = objectives.advantages(b, gen)
    return Inputs(logits, ids, mask, old_logp, ref_logp, advantages, logp64)


# --------------------------------------------------------------------------- one case


def _gate_seqs(rows: int) -> list[int]:
    """Sequences whose gradient is compared: all, or the first two and the last two."""
    if rows <= GATE_GRAD_SEQS:
        return list(range(rows))
    return [0, 1, rows - 2, rows - 1]


def _gate(case: Case, inp: Inputs, fn: LossFn) -> tuple[bool, dict[str, float]]:
    """Run the provider once; compare the loss (and logits grad) with the float64
    reference: d loss / d logp times d logp / d logits, chunk by chunk."""
    backward = case.mode != "fwd"
    logp64 = inp.logp64.detach().clone().requires_grad_(backward)
    ref_loss = objectives.grpo_objective(
        reference.ppo_loss, logp64, inp.mask, inp.old_logp.double(), inp.ref_logp.double(),
        inp.advantages.double(),
    )

    def backprop(g_tok: torch.Tensor, row: int, start: int, stop: int, tok: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return tok, g_tok[row, start:stop]

    return gates.gate_loss_from_logits(
        inp.logits, run=lambda x: fn(*inp.args(x)), fresh=case.provider in OVERWRITE_LOGITS,
        backward=backward, ref_loss=ref_loss, ref_wrt=logp64, targets=inp.ids,
        seqs=_gate_seqs(inp.logits.shape[0]), backprop=backprop, tol=TOLERANCE,
    )


SUITE = cases.logits_loss_suite(
    OP, GPU_SHAPES, QUICK_SHAPES, DTYPE, PROVIDERS, make_inputs, logits_shape=logits_shape,
    gate=_gate, overwrite=OVERWRITE_LOGITS,
    describe=lambda case, inp: {"answer_tokens": int(inp.mask.sum())},
)


def test_grpo(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
