"""Benchmark of `rlhf_fast.orpo_loss` as a trainer computes it: from the policy's final
hidden states and lm_head, against Liger-Kernel's chunked fused linear ORPO loss.

The objective: ORPO, the chosen answers' NLL per token minus beta (0.1) times the mean
over B pairs of log s(log odds ratio) of the answers' per-token-mean log-probs: the op's
defaults and Liger's. The NLL here covers the chosen answers' tokens only, as the op
gets it (the sums of `sequence_logps` over the answer tokens) and as Liger computes it
by default (its ``target``, the prompt labelled -100; ``nll_target=None``). TRL's
ORPOTrainer takes it over the whole chosen sequence, prompt included (its labels are the
input ids wherever the attention mask is 1): Liger's ``nll_target`` is for that, and
rlhf_fast's op would need the prompt's log-probs added to ``policy_chosen`` for the NLL
but not for the odds ratio, which its single input cannot express. Inputs, the rlhf_fast
composition, the float64 gate, the GEMM floor, the ``compile`` provider and the modes:
`preference`'s (pairs; the table's shape ``2B x T x D x V``).

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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rlhf_fast.benchmarks import preference
from rlhf_fast.benchmarks.cases import Case

OP = "orpo_loss"
BETA = 0.1
OPTIONS = {"beta": BETA}
QUICK_SHAPES = preference.PAIR_QUICK_SHAPES


def orpo_objective(chosen: torch.Tensor, rejected: torch.Tensor, chosen_logits: torch.Tensor,
                   chosen_labels: torch.Tensor) -> torch.Tensor:
    """ORPO as TRL's ORPOTrainer writes it, on the answers' per-token mean log-probs (the
    NLL over the answer tokens: module docstring)."""
    log_odds = (chosen - rejected) - (
        torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    ratio = F.logsigmoid(log_odds)
    return preference.eager_chosen_nll(chosen_logits, chosen_labels) - (BETA * ratio).mean()


SUITE, make_inputs = preference.pair_suite(
    OP, OPTIONS, orpo_objective, per_token_mean=True, liger="LigerFusedLinearORPOLoss",
    compute_nll_loss=True)


def test_orpo_loss(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
