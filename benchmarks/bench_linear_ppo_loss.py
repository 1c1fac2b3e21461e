"""Benchmark of `rlhf_fast.linear_ppo_loss`: the GRPO policy loss straight from hidden states.

The objective of the ``grpo`` suite (`objectives`: clip-higher [1 - 0.2, 1 + 0.28] on a per-sequence
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
  ``ref_per_token_logps`` (TRL's ``use_liger_loss`` path): chunks of sequences, the
  gradient w.r.t. the hidden states computed in its forward even when nothing requires
  grad: 3 GEMMs in both modes where its chunks go through ``torch.func`` (earlier
  releases); where its log-probs are a custom autograd function that recomputes the
  logits in its backward (``_ChunkedSelectiveLogProbFunction``, 0.8.5), 3 in fwd and 4
  in fwd+bwd (`provider_gemms`). Skipped, with the reason, where not installed.
* ``eager``: the ``grpo`` suite's eager loss on ``hidden @ weight.T`` (materialised bf16
  logits, fp32 log_softmax).
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Modes: ``fwd`` (nothing requires grad: the loss only) and ``fwd+bwd``
(``torch.autograd.grad`` of the loss w.r.t. hidden and weight).

No ``bwd`` mode: the fused providers split the work between forward and backward
differently (Liger and the fused losses compute gradients in the forward), so a
backward-alone time would compare different work; ``fwd+bwd`` is the comparable number.

Correctness gate, `lm_head`'s (that of the ``linear_logprobs`` suite): the float64
per-token log-probs of every token (``reference.linear_logprobs``, a chunk of rows at a
time) give the float64 loss (``reference.ppo_loss``) and its gradient ``g`` w.r.t. each
token's log-prob; d hidden and d weight are then those of ``sum g * logp``, compared on
the linear_logprobs suite's row and vocab subsets. Relative error <= 2e-2. A provider
that does not match is reported "wrong" and not timed.

Roofline: FLOPs over the measured bf16 GEMM rate, as in the ``linear_logprobs`` suite, with
N = B T: ``floor_flops`` = (fwd 1, fwd+bwd 3) GEMMs of 2 N V D FLOPs; ``gemms`` is what
each provider runs (above; eager and compile: 1 and 3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import cases, lm_head, objectives, peers
from rlhf_fast.benchmarks.cases import Case
from rlhf_fast.benchmarks.inputs import right_padded_mask
from rlhf_fast.benchmarks.lm_head import DTYPE, IGNORE_INDEX
from rlhf_fast.benchmarks.objectives import CLIP_HIGH, CLIP_LOW, GRPO_BETA

OP = "linear_ppo_loss"
#: (B, T, D, V): 8 x 1024 completion tokens through a Llama-3-8B-sized lm_head, 16 x 1024
#: through a Qwen2-7B-width one with the Qwen vocab (the linear_logprobs suite's shapes).
GPU_SHAPES = [(8, 1024, 4096, 128256), (16, 1024, 3584, 151936)]
QUICK_SHAPES = [(2, 16, 16, 100), (4, 80, 64, 3000)]
MODES = lm_head.MODES
#: GEMMs of 2 N V D FLOPs each provider runs, per mode; the floor is eager's.
GEMMS = {"fwd": {"rlhf_fast": 1, "liger": 3, "eager": 1, "compile": 1},
         "fwd+bwd": {"rlhf_fast": 3, "liger": 3, "eager": 3, "compile": 3}}
#: Liger's log-probs that recompute the logits in their backward, where it has them.
LIGER_RECOMPUTING_LOGPROBS = peers.Entry(
    "liger", "liger_kernel.chunked_loss.fused_linear_ppo", "_ChunkedSelectiveLogProbFunction",
    runs=peers.Runs.ANY_DEVICE)


def provider_gemms(mode: str, provider: str) -> int:
    """GEMMs of 2 N V D FLOPs `provider` runs in `mode` (GEMMS; Liger's fwd+bwd: 4 where
    its log-probs recompute the logits in their backward)."""
    if provider == "liger" and mode == "fwd+bwd" and LIGER_RECOMPUTING_LOGPROBS.reason(
            torch.device("cpu")) is None:
        return 4
    return GEMMS[mode][provider]


# --------------------------------------------------------------------------- providers

#: Every provider's signature: (hidden [B, T, D], weight [V, D], ids, mask, old_logp,
#: ref_logp, advantages [B]) -> scalar loss.
LossFn = Callable[..., torch.Tensor]


def rlhf_fast_linear_ppo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
    old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
) -> torch.Tensor:
    return rlhf_fast.linear_ppo_loss(
        hidden,
        weight,
        ids,
        old_logp,
        advantages.unsqueeze(1).expand_as(old_logp),
        mask,
        **objectives.grpo_options(ref_logp),
    ).loss


def eager_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *rest: torch.Tensor,
) -> torch.Tensor:
    """The grpo suite's eager loss on materialised logits ``hidden @ weight.T``."""
    logp = objectives.eager_token_logps(hidden @ weight.T, ids)
    return objectives.eager_grpo_objective(logp, *rest)


LIGER = peers.Entry("liger", "liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss",
                    runs=peers.Runs.ANY_DEVICE)


def liger_linear_ppo_loss(loss_cls: Any, device: torch.device) -> LossFn:
    """Liger-Kernel's chunked fused linear GRPO loss with precomputed reference log-probs."""
    loss_fn = loss_cls(
        beta=GRPO_BETA,
        epsilon_low=CLIP_LOW,
        epsilon_high=CLIP_HIGH,
        loss_type="bnpo",
        compiled=device.type == "cuda",
    )

    def run(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
            old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor
            ) -> torch.Tensor:
        out = loss_fn(
            hidden, weight, ids, mask, advantages,
            ref_per_token_logps=ref_logp, old_per_token_logps=old_logp,
        )
        return peers.first_output(out)

    return run


PROVIDERS = {
    "rlhf_fast": rlhf_fast_linear_ppo_loss,
    "liger": cases.peer(liger_linear_ppo_loss, LIGER, with_device=True),
    **cases.eager_and_compiled(eager_linear_ppo_loss),
}


# --------------------------------------------------------------------------- inputs


#: Per (shape, device): the float64 token log-probs and (loss64, grads). The inputs are
#: seeded, so every provider of a shape shares them.
_token_logps: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}
_references: dict[tuple[tuple[int, ...], str], tuple[torch.Tensor, Any]] = {}


def make_inputs(shape: tuple[int, int, int, int], device: torch.device
                ) -> lm_head.LossInputs:
    """Seeded inputs (hidden / weight scaled as `lm_head` says) and their float64
    reference (once per shape): the loss, and d hidden / d weight on the gate's subsets."""
    b, t, d, v = shape
    gen = torch.Generator(device=device).manual_seed(1234)
    hidden = torch.randn((b, t, d), generator=gen, device=device).to(DTYPE)
    weight = lm_head.lm_head(v, d, gen)
    ids = torch.randint(0, v, (b, t), generator=gen, device=device)
    mask = right_padded_mask(b, t, gen)

    key = (shape, str(device))
    if key not in _token_logps:
        _token_logps[key] = lm_head.reference_token_logps(hidden, weight, ids)
    logp64 = _token_logps[key]

    old_logp, ref_logp = objectives.policy_neighbours(logp64, gen)
    advantages = objectives.advantages(b, gen)

    if key not in _references:
        logp64 = logp64.detach().requires_grad_(True)
        loss64 = objectives.grpo_objective(
            reference.ppo_loss, logp64, mask, old_logp.double(), ref_logp.double(),
            advantages.double(),
        )
        # masked tokens: g = 0, ignored
        grads = lm_head.loss_reference(loss64, logp64, hidden, weight,
                                       ids.masked_fill(~mask, IGNORE_INDEX))
        _references[key] = (loss64.detach(), grads)
    loss64, grads = _references[key]
    return lm_head.LossInputs(hidden, weight, ids, (mask, old_logp, ref_logp, advantages),
                              loss64, grads)


# --------------------------------------------------------------------------- one case


SUITE = lm_head.loss_suite(
    OP, GPU_SHAPES, QUICK_SHAPES, PROVIDERS, make_inputs, gemms=provider_gemms,
    floor_gemms=lm_head.FLOOR_GEMMS, tokens=lambda shape: shape[0] * shape[1],
)


def test_linear_ppo_loss(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
