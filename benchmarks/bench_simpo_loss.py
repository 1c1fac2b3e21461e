"""Benchmark of `rlhf_fast.simpo_loss` as a trainer computes it: from the policy's final
hidden states and lm_head, against Liger-Kernel's chunked fused linear SimPO loss.

The objective: SimPO (reference-free), beta 0.1, gamma 0.5, no label smoothing, mean
over B pairs, no NLL term: the op's defaults, Liger's (once its NLL is off, below) and
TRL ``CPOTrainer(loss_type="simpo", cpo_alpha=0)``'s. Inputs, the rlhf_fast composition,
the float64 gate, the GEMM floor, the ``compile`` provider and the modes: `preference`'s
(pairs; the table's shape ``2B x T x D x V``).

Providers (same inputs, same process), each returning the 0-d loss:

* ``rlhf_fast``: ``rlhf_fast.linear_logprobs`` + ``rlhf_fast.sequence_logps`` (the answer
  sums) and the answer lengths (mask row sums), then ``rlhf_fast.simpo_loss(chosen,
  rejected, chosen_lengths, rejected_lengths, beta=0.1, gamma=0.5).loss`` (the op takes
  the per-token means). GEMMs of 2 N V D: fwd 1, fwd+bwd 4.
* ``liger``: Liger-Kernel's ``LigerFusedLinearSimPOLoss(beta=0.1, gamma=0.5,
  compute_nll_loss=False, compiled=<on CUDA>)`` called ``(weight, hidden, labels)``; its
  log-probs the mean over each answer's tokens (its base's ``average_log_prob=True``),
  its loss summed over the pairs / B. Its module's default ``compute_nll_loss=True``
  adds ``alpha`` (1.0) times the chosen answers' NLL: CPO-SimPO (TRL CPOTrainer's
  default ``cpo_alpha=1``), not SimPO, so it is turned off here (with it on, the gate
  fails it: tests/test_bench_peers.py). PyTorch code, so it runs on the CPU too; skipped,
  with the reason, where not installed.
* ``eager``: as TRL's CPOTrainer writes SimPO: the bf16 logits materialised, fp32
  ``log_softmax``, ``gather``, each answer's mean log-prob (``get_batch_logps(...,
  average_log_prob=True)``), ``logits = (chosen - rejected) - gamma / beta``,
  ``-logsigmoid(beta * logits).mean()``. GEMMs: fwd 1, fwd+bwd 3.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rlhf_fast.benchmarks import preference
from rlhf_fast.benchmarks.cases import Case

OP = "simpo_loss"
BETA = 0.1
GAMMA = 0.5
OPTIONS = {"beta": BETA, "gamma": GAMMA}
QUICK_SHAPES = preference.PAIR_QUICK_SHAPES


def simpo_objective(chosen: torch.Tensor, rejected: torch.Tensor, *_: torch.Tensor
                    ) -> torch.Tensor:
    """SimPO as TRL's CPOTrainer writes it, on the answers' per-token mean log-probs."""
    logits = (chosen - rejected) - GAMMA / BETA
    return -F.logsigmoid(BETA * logits).mean()


SUITE, make_inputs = preference.pair_suite(
    OP, OPTIONS, simpo_objective, per_token_mean=True, liger="LigerFusedLinearSimPOLoss",
    compute_nll_loss=False)


def test_simpo_loss(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
