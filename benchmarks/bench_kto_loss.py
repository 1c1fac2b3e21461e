"""Benchmark of `rlhf_fast.kto_loss` as a trainer computes it: from the policy's and the
reference model's final hidden states and lm_heads, against Liger-Kernel's chunked
fused linear KTO loss.

The objective: KTO, beta 0.1, both group weights 1, on each answer's log-prob sums
(policy minus reference), against a reference point KL of 0.2 (given, detached, as TRL's
KTOTrainer estimates it from mismatched pairs), mean over all B examples: the op's
defaults, Liger's (which has no group weights) and TRL ``KTOTrainer``'s
(``loss_type="kto"``). Inputs (B unpaired examples, half desirable, a reference model),
the rlhf_fast composition, the float64 gate, the GEMM floor, the ``compile`` provider
and the modes: `preference`'s; the table's shape is ``B x T x D x V``.

Providers (same inputs, same process), each returning the 0-d loss:

* ``rlhf_fast``: the reference model's answer sums under ``torch.no_grad``
  (``rlhf_fast.linear_logprobs`` + ``rlhf_fast.sequence_logps``), then the policy's,
  then ``rlhf_fast.kto_loss(policy, reference, desirable, kl, beta=0.1).loss``. GEMMs of
  2 N V D: fwd 2, fwd+bwd 5 (the policy's backward recomputes its logits).
* ``liger``: Liger-Kernel's ``LigerFusedLinearKTOLoss(beta=0.1, use_ref_model=True,
  average_log_prob=False, compiled=<on CUDA>)`` called ``(hidden, weight, labels,
  preference_labels=desirable, ref_input=..., ref_weight=..., kl=kl)`` (its module takes
  the hidden states first, unlike its paired losses): the log-prob sums (its default;
  `rlhf_fast.kto_loss`'s docstring says per-token means, which no Liger release has
  defaulted to), the reference model run inside, chunk by chunk (it has no
  precomputed-reference input). Its ``kl`` is not clamped at 0 (TRL's and the op's is):
  the same here, KL > 0. GEMMs: fwd 2, fwd+bwd 4 (`preference`: fwd 4 in releases that
  compute the gradient regardless). PyTorch code, so it runs on the CPU too; skipped,
  with the reason, where not installed.
* ``eager``: TRL's ``KTOTrainer.kto_loss`` on materialised logits: both models' bf16
  logits (the reference's under no_grad), fp32 ``log_softmax``, ``gather``, masked
  sums, ``1 - sigmoid(beta * (logratio - kl))`` for a desirable example and ``1 -
  sigmoid(beta * (kl - logratio))`` for an undesirable one, the mean over all B (TRL
  indexes the two groups and concatenates them; written with ``torch.where`` here, the
  same values without data-dependent shapes for ``torch.compile``). GEMMs: fwd 2,
  fwd+bwd 4.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast.benchmarks import cases, objectives, peers, preference
from rlhf_fast.benchmarks.cases import Case
from rlhf_fast.benchmarks.lm_head import IGNORE_INDEX

OP = "kto_loss"
BETA = 0.1
OPTIONS = {"beta": BETA}
QUICK_SHAPES = preference.KTO_QUICK_SHAPES

#: Every provider's signature: (hidden, weight, labels, ref_hidden, ref_weight,
#: desirable, kl) -> the 0-d loss.


def eager_kto_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
                   desirable: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """KTO as TRL's KTOTrainer writes it, on materialised logits (its two groups'
    losses by torch.where rather than indexing)."""
    with torch.no_grad():
        ref_logps = objectives.eager_sequence_logps(ref_hidden @ ref_weight.T, labels)
    logps = objectives.eager_sequence_logps(hidden @ weight.T, labels)
    logratios = logps - ref_logps
    losses = torch.where(desirable, 1 - torch.sigmoid(BETA * (logratios - kl)),
                         1 - torch.sigmoid(BETA * (kl - logratios)))
    return losses.mean()


def liger_kto_loss(loss_cls: Any, device: torch.device) -> Any:
    """Liger-Kernel's chunked KTO loss, the reference model computed inside."""
    loss_fn = loss_cls(ignore_index=IGNORE_INDEX, use_ref_model=True, average_log_prob=False,
                       compiled=device.type == "cuda", **OPTIONS)

    def run(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
            ref_hidden: torch.Tensor, ref_weight: torch.Tensor, desirable: torch.Tensor,
            kl: torch.Tensor) -> torch.Tensor:
        out = loss_fn(hidden, weight, labels, preference_labels=desirable,
                      ref_input=ref_hidden, ref_weight=ref_weight, kl=kl)
        return peers.first_output(out)

    return run


SUITE, make_inputs = preference.suite(
    OP, OPTIONS, paired=False, eager=eager_kto_loss,
    liger=cases.peer(liger_kto_loss, preference.liger_entry("LigerFusedLinearKTOLoss"),
                     with_device=True))


def test_kto_loss(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
