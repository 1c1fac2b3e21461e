"""Benchmark of `rlhf_fast.simpo_loss` as a trainer computes it: from the policy's final
hidden states and lm_head, against Liger-Kernel's chunked fused linear SimPO loss.

The objective: SimPO (reference-free), beta 0.1, gamma 0.5, no label smoothing, mean
over B pairs, no NLL term: the op's defaults, Liger's (once its NLL is off, below) and
TRL ``CPOTrainer(loss_type="simpo", cpo_alpha=0)``'s. Inputs, the rlhf_fast
composition, the float64 gate and the GEMM floor: `preference`'s (pairs; the table's
shape ``2B x T x D x V``).

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

OP = "simpo_loss"
BETA = 0.1
GAMMA = 0.5
OPTIONS = {"beta": BETA, "gamma": GAMMA}
GPU_SHAPES = preference.PAIR_GPU_SHAPES
QUICK_SHAPES = preference.PAIR_QUICK_SHAPES
MODES = lm_head.MODES


def eager_simpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                     ) -> torch.Tensor:
    """SimPO as TRL's CPOTrainer writes it, on materialised logits."""
    _, sums, lengths = preference.eager_answer_logps(hidden, weight, labels)
    mean_logps = sums / lengths
    pairs = labels.shape[0] // 2
    logits = (mean_logps[:pairs] - mean_logps[pairs:]) - GAMMA / BETA
    return -F.logsigmoid(BETA * logits).mean()


LIGER = preference.liger_pair_entry("LigerFusedLinearSimPOLoss")

PROVIDERS = {
    "rlhf_fast": preference.rlhf_fast_pair_loss(
        preference.with_options(rlhf_fast.simpo_loss, **OPTIONS)),
    "liger": cases.peer(functools.partial(preference.liger_pair_loss,
                                          compute_nll_loss=False, **OPTIONS),
                        LIGER, with_device=True),
    **cases.eager_and_compiled(eager_simpo_loss),
}


def make_inputs(shape: tuple[int, int, int, int], device: torch.device
                ) -> lm_head.LossInputs:
    return preference.pair_inputs(OP, preference.with_options(reference.simpo_loss, **OPTIONS),
                                  shape, device)


SUITE = preference.suite(OP, GPU_SHAPES, QUICK_SHAPES, PROVIDERS, make_inputs, paired=True)


def test_simpo_loss(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
