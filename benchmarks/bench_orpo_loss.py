"""Benchmark of `rlhf_fast.orpo_loss` as a trainer computes it: from the policy's final
hidden states and lm_head, against Liger-Kernel's chunked fused linear ORPO loss.

The objective: ORPO, the chosen answers' NLL per token minus beta (0.1) times the mean
over B pairs of log s(log odds ratio) of the answers' per-token-mean log-probs: the op's
defaults and Liger's. The NLL here covers the chosen answers' tokens only, as the op
gets it (the sums of `sequence_logps` over the answer tokens) and as Liger computes it
by default (its ``target``, the prompt labelled -100; ``nll_target=None``). TRL's
ORPOTrainer takes it over the whole chosen sequence, prompt included (its labels are
the input ids wherever the attention mask is 1): Liger's ``nll_target`` is for that,
and rlhf_fast's op would need the prompt's log-probs added to ``policy_chosen`` for the
NLL but not for the odds ratio, which its single input cannot express. Inputs, the
rlhf_fast composition, the float64 gate and the GEMM floor: `preference`'s (pairs; the
table's shape ``2B x T x D x V``).

Providers (same inputs, same process), each returning the 0-d loss:

* ``rlhf_fast``: ``rlhf_fast.linear_logprobs`` + ``rlhf_fast.sequence_logps`` (the answer
  sums) and the answer lengths (mask row sums), then ``rlhf_fast.orpo_loss(chosen,
  rejected, chosen_lengths, rejected_lengths, beta=0.1).loss`` (the op takes the
  per-token means and the NLL). GEMMs of 2 N V D: fwd 1, fwd+bwd 4.
* ``liger``: Liger-Kernel's ``LigerFusedLinearORPOLoss(beta=0.1, compute_nll_loss=True,
  compiled=<on CUDA>)`` called ``(weight, hidden, labels)``: per-token-mean log-probs
  (its base's ``average_log_prob=True``), the NLL weighted by its base's ``alpha=1``.
  PyTorch code, so it runs on the CPU too; skipped, with the reason, where not installed.
* ``eager``: TRL's ``ORPOTrainer.odds_ratio_loss`` on materialised logits: the bf16
  logits, fp32 ``log_softmax``, ``gather``, each answer's mean log-prob, ``log_odds =
  (c - r) - (log1p(-exp(c)) - log1p(-exp(r)))``, ``nll - (beta *
  logsigmoid(log_odds)).mean()``, the NLL ``F.cross_entropy`` of the chosen rows'
  logits (fp32) against their answer labels (TRL's over the prompt too: above).
  GEMMs: fwd 1, fwd+bwd 3.
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Modes: ``fwd`` (nothing requires grad) and ``fwd+bwd`` (``torch.autograd.grad`` of the
loss w.r.t. the hidden states and lm_head); no ``bwd`` (Liger computes its gradient in
its forward).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import cases, lm_head, preference
from rlhf_fast.benchmarks.cases import Case
from rlhf_fast.benchmarks.lm_head import IGNORE_INDEX

OP = "orpo_loss"
BETA = 0.1
OPTIONS = {"beta": BETA}
GPU_SHAPES = preference.PAIR_GPU_SHAPES
QUICK_SHAPES = preference.PAIR_QUICK_SHAPES
MODES = lm_head.MODES


def eager_orpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                    ) -> torch.Tensor:
    """ORPO as TRL's ORPOTrainer writes it, on materialised logits (the NLL over the
    answer tokens: module docstring)."""
    logits, sums, lengths = preference.eager_answer_logps(hidden, weight, labels)
    mean_logps = sums / lengths
    pairs = labels.shape[0] // 2
    chosen, rejected = mean_logps[:pairs], mean_logps[pairs:]
    log_odds = (chosen - rejected) - (
        torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    ratio = F.logsigmoid(log_odds)
    nll = F.cross_entropy(logits[:pairs].float().flatten(0, 1), labels[:pairs].flatten(),
                          ignore_index=IGNORE_INDEX)
    return nll - (BETA * ratio).mean()


LIGER = preference.liger_pair_entry("LigerFusedLinearORPOLoss")

PROVIDERS = {
    "rlhf_fast": preference.rlhf_fast_pair_loss(
        preference.with_options(rlhf_fast.orpo_loss, **OPTIONS)),
    "liger": cases.peer(functools.partial(preference.liger_pair_loss, compute_nll_loss=True,
                                          **OPTIONS),
                        LIGER, with_device=True),
    **cases.eager_and_compiled(eager_orpo_loss),
}


def make_inputs(shape: tuple[int, int, int, int], device: torch.device
                ) -> lm_head.LossInputs:
    return preference.pair_inputs(OP, preference.with_options(reference.orpo_loss, **OPTIONS),
                                  shape, device)


SUITE = preference.suite(OP, GPU_SHAPES, QUICK_SHAPES, PROVIDERS, make_inputs, paired=True)


def test_orpo_loss(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
