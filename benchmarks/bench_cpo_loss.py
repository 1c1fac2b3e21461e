"""Benchmark of `rlhf_fast.cpo_loss` as a trainer computes it: from the policy's final
hidden states and lm_head, against Liger-Kernel's chunked fused linear CPO loss.

The objective: CPO (reference-free), the sigmoid term on the answers' log-prob sums,
beta 0.1, no label smoothing, plus alpha = 1 times the chosen answers' NLL per token
(over the answer tokens), mean over B pairs: the op's defaults, Liger's and TRL
``CPOTrainer``'s (``loss_type="sigmoid"``, ``cpo_alpha=1``). Inputs, the rlhf_fast
composition, the float64 gate and the GEMM floor: `preference`'s (pairs; the table's
shape ``2B x T x D x V``).

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

OP = "cpo_loss"
BETA = 0.1
ALPHA = 1.0
OPTIONS = {"beta": BETA, "alpha": ALPHA}
GPU_SHAPES = preference.PAIR_GPU_SHAPES
QUICK_SHAPES = preference.PAIR_QUICK_SHAPES
MODES = lm_head.MODES


def eager_cpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                   ) -> torch.Tensor:
    """CPO as TRL's CPOTrainer writes it (sigmoid), on materialised logits."""
    logits, sums, _ = preference.eager_answer_logps(hidden, weight, labels)
    pairs = labels.shape[0] // 2
    losses = -F.logsigmoid(BETA * (sums[:pairs] - sums[pairs:]))
    nll = F.cross_entropy(logits[:pairs].float().flatten(0, 1), labels[:pairs].flatten(),
                          ignore_index=IGNORE_INDEX)
    return losses.mean() + ALPHA * nll


LIGER = preference.liger_pair_entry("LigerFusedLinearCPOLoss")

PROVIDERS = {
    "rlhf_fast": preference.rlhf_fast_pair_loss(
        preference.with_options(rlhf_fast.cpo_loss, **OPTIONS)),
    "liger": cases.peer(functools.partial(preference.liger_pair_loss, compute_nll_loss=True,
                                          average_log_prob=False, **OPTIONS),
                        LIGER, with_device=True),
    **cases.eager_and_compiled(eager_cpo_loss),
}


def make_inputs(shape: tuple[int, int, int, int], device: torch.device
                ) -> lm_head.LossInputs:
    return preference.pair_inputs(OP, preference.with_options(reference.cpo_loss, **OPTIONS),
                                  shape, device)


SUITE = preference.suite(OP, GPU_SHAPES, QUICK_SHAPES, PROVIDERS, make_inputs, paired=True)


def test_cpo_loss(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
