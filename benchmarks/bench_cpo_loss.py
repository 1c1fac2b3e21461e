"""Benchmark of `rlhf_fast.cpo_loss` as a trainer computes it: from the policy's final
hidden states and lm_head, against Liger-Kernel's chunked fused linear CPO loss.

The objective: CPO (reference-free), the sigmoid term on the answers' log-prob sums,
beta 0.1, no label smoothing, plus alpha = 1 times the chosen answers' NLL per token
(over the answer tokens), mean over B pairs: the op's defaults, Liger's and TRL
``CPOTrainer``'s (``loss_type="sigmoid"``, ``cpo_alpha=1``). Inputs, the rlhf_fast
composition, the float64 gate, the GEMM floor, the ``compile`` provider and the modes:
`preference`'s (pairs; the table's shape ``2B x T x D x V``).

Providers (same inputs, same process), each returning the 0-d loss:

* ``rlhf_fast``: ``rlhf_fast.linear_logprobs`` + ``rlhf_fast.sequence_logps`` (the answer
  sums) and the answer lengths (mask row sums: the NLL's token count), then
  ``rlhf_fast.cpo_loss(chosen, rejected, chosen_lengths, rejected_lengths, beta=0.1,
  alpha=1.0).loss``. GEMMs of 2 N V D: fwd 1, fwd+bwd 4.
* ``liger``: Liger-Kernel's ``LigerFusedLinearCPOLoss(beta=0.1, alpha=1.0,
  compute_nll_loss=True, average_log_prob=False, compiled=<on CUDA>)`` (its defaults,
  written out) called ``(weight, hidden, labels)``: the log-prob sums, the NLL summed
  over the chosen answers' tokens (its ``target``: the prompt is -100) / their count.
  PyTorch code, so it runs on the CPU too; skipped, with the reason, where not installed.
* ``eager``: as TRL's CPOTrainer writes it: the bf16 logits materialised, fp32
  ``log_softmax``, ``gather``, masked sums, ``-logsigmoid(beta * (chosen -
  rejected)).mean()``, plus ``alpha`` times ``F.cross_entropy`` of the chosen rows'
  logits (fp32) against their labels (its ``nll_loss``, a second pass over those
  logits). GEMMs: fwd 1, fwd+bwd 3.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rlhf_fast.benchmarks import preference
from rlhf_fast.benchmarks.cases import Case

OP = "cpo_loss"
BETA = 0.1
ALPHA = 1.0
OPTIONS = {"beta": BETA, "alpha": ALPHA}
QUICK_SHAPES = preference.PAIR_QUICK_SHAPES


def cpo_objective(chosen: torch.Tensor, rejected: torch.Tensor, chosen_logits: torch.Tensor,
                  chosen_labels: torch.Tensor) -> torch.Tensor:
    """CPO as TRL's CPOTrainer writes it (sigmoid), on the answers' log-prob sums."""
    losses = -F.logsigmoid(BETA * (chosen - rejected))
    return losses.mean() + ALPHA * preference.eager_chosen_nll(chosen_logits, chosen_labels)


SUITE, make_inputs = preference.pair_suite(
    OP, OPTIONS, cpo_objective, per_token_mean=False, liger="LigerFusedLinearCPOLoss",
    compute_nll_loss=True, average_log_prob=False)


def test_cpo_loss(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
