"""Benchmark of `rlhf_fast.token_divergence` (distillation's per-token divergence of a
student's distribution from a teacher's) against what a user would write instead.

Variants: the three divergences, ``jsd`` (at beta 0.5), ``forward_kl`` (KL(teacher ||
student)) and ``reverse_kl`` (KL(student || teacher)), every case at temperature 1.

Providers (same inputs, same process), each given the student logits, the teacher logits
(a constant, never requiring grad) and the labels (-100: a row not counted):

* ``rlhf_fast``: ``rlhf_fast.token_divergence``, per token (0 at ignored rows).
* ``rlhf_fast-inplace``: the same with ``inplace_backward=True`` (backward modes only;
  the forward is identical). Its student logits are overwritten by the gradient, so every
  timed call gets a fresh copy of them, made untimed before the call.
* ``eager``: what TRL's GKD trainer computes (``GKDTrainer.generalized_jsd_loss``,
  trl/experimental/gkd/gkd_trainer.py), per token: ``log_softmax`` of both logits,
  ``F.kl_div(..., reduction="none", log_target=True)``; for 0 < beta < 1 the mixture's
  log ``logsumexp`` of the stacked ``log q + log(1 - beta)`` and ``log p + log(beta)``,
  then ``beta KL(p || m) + (1 - beta) KL(q || m)``; the KLs are TRL's beta = 0 and 1
  branches, ``F.kl_div(log q, log p)`` (forward) and ``F.kl_div(log p, log q)``
  (reverse). Summed over the vocabulary, not reduced over tokens, and the ignored rows
  zeroed (TRL drops them with ``jsd[labels != -100]`` before its reduction, which costs
  the same). One departure: TRL takes ``log_softmax`` in the logits' dtype; this takes
  it in fp32 (an fp32 copy of both logits first), as trainers upcast bf16 logits and as
  the other suites' eager providers do.
* ``compile``: ``torch.compile`` of ``eager``, one compiled copy per divergence (GPU
  only; skipped in CPU quick mode).
* ``liger``: Liger-Kernel's ``LigerJSD(beta, ignore_index=-100)`` on
  ``log_softmax`` of both logits taken in fp32, as its docs and benchmark feed it
  (``LigerJSD()(student log-probs, teacher log-probs, labels)``: the student, its
  ``log_q``, first). Its convention is ours: ``X = log Q`` the student's, ``Y = log P``
  the teacher's, ``M = beta P + (1 - beta) Q``, ``beta KL(P || M) + (1 - beta) KL(Q ||
  M)``, the forward KL at beta 0 and the reverse KL at beta 1 (its kernel's own
  branches): so jsd runs it at beta 0.5, forward_kl at 0 and reverse_kl at 1. It returns
  the loss reduced, ``sum / n_non_ignore`` (its per-token values are summed inside,
  never returned), so its gate compares that with the float64 reference's same reduction
  over all rows (``loss``) instead of per token, and its gradient with the reference's
  gradient of that reduction; its backward modes backpropagate 1 (the loss a trainer
  calls backward on), where the per-token providers get random upstream gradients. Its
  forward computes the gradient of the log-probs too (even without grad), and an fp32
  ``[N, V]`` loss tile. Liger picks its own kernel (Triton, or its CuTe DSL one on
  Hopper where that is installed). Runs on CUDA, or under TRITON_INTERPRET=1; skipped,
  with the reason, where missing.

Modes: ``fwd`` (student logits not requiring grad), ``bwd`` (backward alone; the
forward building its graph runs untimed before each call) and ``fwd+bwd``
(``torch.autograd.grad`` w.r.t. the student logits, with random upstream gradients per
token for the per-token providers). Every provider is first checked against
``rlhf_fast.reference.token_divergence`` in float64 on the same inputs (per token and
gradient on a subset of rows at the GPU shapes; Liger's reduced loss over all rows,
chunk by chunk); one that does not match is reported "wrong" and not timed.

Bytes moved (the floor): fwd reads both logits (2 logits-sized tensors), bwd reads both
and writes the student's gradient (3), fwd+bwd both (5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import cases, gates, objectives, peers, per_token
from rlhf_fast.benchmarks.cases import Case
from rlhf_fast.benchmarks.inputs import provider_input, scaled_logits, token_labels
from rlhf_fast.benchmarks.per_token import (
    GATE_ALL_ROWS,
    GATE_ROWS,
    IGNORE_INDEX,
    TOLERANCE,
)

OP = "token_divergence"
MODES = per_token.MODES
#: Providers that write into the student logits when they require grad: fresh copy per call.
OVERWRITE_LOGITS = ("rlhf_fast-inplace",)
#: Providers returning the loss reduced over the counted rows (sum / their count).
REDUCED = ("liger",)
#: The liger provider's entry point.
LIGER = peers.Entry("liger", "liger_kernel.transformers", "LigerJSD")
#: The divergences, each a variant; jsd at beta BETA.
VARIANTS = objectives.DIVERGENCES
BETA = objectives.JSD_BETA
#: The beta at which TRL's and Liger's JSD give each variant (their KLs: beta 0 and 1).
PEER_BETA = objectives.PEER_BETA


#: `token_divergence`'s options for a variant (beta is read by jsd only).
options = objectives.divergence_options


# --------------------------------------------------------------------------- providers

#: TRL's GKD ``generalized_jsd_loss`` per token, log-probs in fp32 (module docstring).
eager_divergence = objectives.eager_divergence


def _rlhf_fast(inplace: bool) -> Callable[..., torch.Tensor]:
    def run(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
            divergence: str) -> torch.Tensor:
        return rlhf_fast.token_divergence(student, teacher, labels, ignore_index=IGNORE_INDEX,
                                          inplace_backward=inplace, **options(divergence))

    return run


def _compiled_eager(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                    divergence: str) -> torch.Tensor:
    """``torch.compile`` of ``eager``, one compiled copy per divergence: each sees (shapes
    x grad / no grad) = 4 graphs, under dynamo's per-function graph limit."""
    return peers.compiled(eager_divergence, divergence)(student, teacher, labels, divergence)


def liger_divergence(jsd_cls: Any) -> Callable[..., torch.Tensor]:
    """Liger-Kernel's ``LigerJSD`` on fp32 log-probs: the loss reduced, sum over the
    counted rows / their count."""
    losses = {variant: jsd_cls(beta=PEER_BETA[variant], ignore_index=IGNORE_INDEX)
              for variant in VARIANTS}

    def run(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
            divergence: str) -> torch.Tensor:
        log_q = student.float().log_softmax(-1)
        log_p = teacher.float().log_softmax(-1)
        return losses[divergence](log_q, log_p, labels)

    return run


#: Every provider's signature: (student, teacher, labels, divergence) -> the divergence
#: per token ``[N]`` (0 at ignored rows), or for the ones in REDUCED the reduced loss.
PROVIDERS = per_token.rlhf_fast_providers(_rlhf_fast) | {
    "eager": eager_divergence,
    "compile": _compiled_eager,
    "liger": cases.peer(liger_divergence, LIGER),
}


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """One case's tensors. ``student`` is never written: in-place providers get copies."""

    student: torch.Tensor
    teacher: torch.Tensor
    labels: torch.Tensor
    g: torch.Tensor


def make_inputs(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Inputs:
    """Random student and teacher logits, independent, of std 2 and 3 (a sharper teacher:
    the two KLs differ, even summed over the rows), random labels with ~3% ignored rows,
    a random upstream gradient per token."""
    n, v = shape
    gen = torch.Generator(device=device).manual_seed(1234)
    student = scaled_logits(shape, 2.0, dtype, gen)
    teacher = scaled_logits(shape, 3.0, dtype, gen)
    labels = token_labels(n, v, IGNORE_INDEX, gen)
    g = torch.randn(n, generator=gen, device=device)
    return Inputs(student, teacher, labels, g)


#: Logits-sized tensors each mode must move at least: fwd reads both logits, bwd reads
#: both and writes the student's gradient, fwd+bwd both.
LOGITS_PASSES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}


# --------------------------------------------------------------------------- one case


def reference_reduced(inp: Inputs, divergence: str) -> torch.Tensor:
    """The float64 reference's loss reduced as Liger reduces it, sum over the counted
    rows / their count, computed over all rows chunk by chunk (no float64 copy of the
    whole logits)."""
    step = max(1, gates.REF_CHUNK_ELEMENTS // inp.student.shape[-1])
    total = torch.zeros((), dtype=torch.float64, device=inp.student.device)
    with torch.no_grad():
        for start in range(0, inp.student.shape[0], step):
            rows = slice(start, start + step)
            total += reference.token_divergence(
                inp.student[rows].double(), inp.teacher[rows].double(), inp.labels[rows],
                ignore_index=IGNORE_INDEX, **options(divergence)).sum()
    return total / (inp.labels != IGNORE_INDEX).sum().clamp(min=1)


def _gate(case: Case, inp: Inputs, fn: Callable[..., torch.Tensor]
          ) -> tuple[bool, dict[str, float]]:
    """Run the provider once and compare its divergence (per token, or Liger's reduced
    loss) and gradient with the float64 reference (all rows, or GATE_ROWS spread +
    ignored ones)."""
    rows = gates.gate_rows(inp.labels, IGNORE_INDEX, spread=GATE_ROWS, all_rows=GATE_ALL_ROWS)
    backward = case.mode != "fwd"
    reduced = case.provider in REDUCED
    ref_student = inp.student[rows].detach().to(torch.float64).requires_grad_(backward)
    ref = reference.token_divergence(ref_student, inp.teacher[rows].double(), inp.labels[rows],
                                     ignore_index=IGNORE_INDEX, **options(case.variant))
    n_counted = (inp.labels != IGNORE_INDEX).sum().clamp(min=1).double()

    x = provider_input(inp.student, backward, fresh=case.provider in OVERWRITE_LOGITS)
    out = fn(x, inp.teacher, inp.labels, case.variant)
    errors: dict[str, float] = {}
    if reduced:
        ok, errors["loss"] = gates.check_close(out, reference_reduced(inp, case.variant),
                                               TOLERANCE[case.dtype])
    else:
        ok, errors["divergence"] = gates.check_close(out[rows], ref, TOLERANCE[case.dtype])
    if backward:
        (grad,) = torch.autograd.grad(out, x, None if reduced else inp.g)
        upstream = (torch.ones_like(ref) / n_counted) if reduced else inp.g[rows].double()
        (ref_grad,) = torch.autograd.grad(ref, ref_student, upstream)
        good, errors["grad"] = gates.check_close(grad[rows], ref_grad, TOLERANCE[case.dtype])
        ok &= good
    return ok, errors


def _timed(case: Case, inp: Inputs, fn: Callable[..., torch.Tensor]
           ) -> tuple[Callable[..., Any], Callable[[], Any] | None]:
    """The timed call and its untimed per-call setup (or None) for the case's mode, with a
    random upstream gradient per token (Liger's reduced loss: 1)."""
    teacher, labels, divergence = inp.teacher, inp.labels, case.variant
    grads = None if case.provider in REDUCED else (inp.g,)
    return cases.timed_calls(inp.student, lambda x: fn(x, teacher, labels, divergence),
                             case.mode, fresh=case.provider in OVERWRITE_LOGITS, grads=grads)


SUITE = per_token.suite(OP, PROVIDERS, VARIANTS, make_inputs, gate=_gate, timed=_timed,
                        logits_passes=LOGITS_PASSES)


def test_token_divergence(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
