"""Benchmark of `rlhf_fast.linear_token_divergence` (distillation straight from both
models' final hidden states and lm_heads) against what a user would write instead.

Variants: the ``token_divergence`` suite's three divergences (`objectives`): ``jsd`` at
beta 0.5, ``forward_kl`` (KL(teacher || student)) and ``reverse_kl`` (KL(student ||
teacher)), every case at temperature 1.

Inputs: the student's bf16 ``hidden [N, D]`` and lm_head ``weight [V, D]`` scaled as
`lm_head` says (logits of std ~3), the teacher's independent ones with its lm_head
scaled by TEACHER_SCALE (logits of std ~4: a sharper teacher, so the two KLs differ),
both models of the same width D (the table's shape is ``N x D x V``), labels uniform
in ``[0, V)`` with ~3% (and row N / 2) set to -100 (a row not counted), a random fp32
upstream gradient per token. The teacher never requires grad.

Providers (same inputs, same process), each given (student hidden, student lm_head,
teacher hidden, teacher lm_head, labels, divergence):

* ``rlhf_fast``: ``rlhf_fast.linear_token_divergence(..., labels, divergence=...,
  beta=0.5 for jsd)``, per token (0 at ignored rows), neither model's ``[N, V]`` logits
  ever whole. GEMMs of 2 N V D: fwd 2 (both models' logits), fwd+bwd 6 (the backward
  recomputes both models' logits chunk by chunk, then d hidden and d weight).
* ``eager``: what TRL's GKD trainer computes from the two models' outputs: both
  models' bf16 logits materialised (``hidden @ weight.T``, the teacher's under no_grad),
  then the ``token_divergence`` suite's eager divergence (``objectives.eager_divergence``:
  ``GKDTrainer.generalized_jsd_loss`` per token, log-probs in fp32). GEMMs: fwd 2,
  fwd+bwd 4 (the logits are kept for the backward).
* ``compile``: ``torch.compile`` of ``eager``, one compiled copy per divergence (GPU
  only; skipped in CPU quick mode).
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSD(jsd_beta, ignore_index=-100)``, its
  other options default (temperature 1, ``accum_dtype=None``: d weight accumulated over
  its token chunks in the weight's dtype), called as ``(student_input, student_weight,
  teacher_input, teacher_weight, shift_labels)``: the student first. Its convention is
  ours and TRL's (its JSD kernel's ``X = log Q`` the student's, ``Y = log P`` the
  teacher's; beta weights the teacher; beta 0 its forward-KL branch, 1 its reverse-KL
  branch): so jsd runs it at jsd_beta 0.5, forward_kl at 0 and reverse_kl at 1
  (`objectives.PEER_BETA`). It returns the loss reduced, sum over the counted rows /
  their count, so its gate compares that with the float64 reference's same reduction
  and its gradients with the reference's gradients of it; its fwd+bwd mode
  backpropagates 1 (the loss a trainer calls backward on), where the per-token providers
  get random upstream gradients. It chunks the tokens and computes d hidden in its
  forward even when nothing requires grad (and d weight where the weight requires it):
  GEMMs fwd 3, fwd+bwd 4. Its inner JSD is a Triton kernel: runs on CUDA, or under
  TRITON_INTERPRET=1; skipped, with the reason, where missing.

Modes: ``fwd`` (nothing requires grad: an evaluation pass) and ``fwd+bwd``
(``torch.autograd.grad`` w.r.t. the student's hidden states and lm_head). No ``bwd``
mode, as in the other suites from hidden states: the fused providers split the work
between forward and backward differently (Liger computes its gradients in the
forward), so only ``fwd+bwd`` compares the same work. ``rlhf-fast bench --headline``
runs the jsd variant only (HEADLINE_VARIANTS): the three run the same GEMMs.

Correctness gate (before any timing; a provider that fails it is reported "wrong" and
not timed), against float64 results computed once per (shape, divergence) and shared by
every provider (the inputs are seeded): the divergence and d hidden on `lm_head`'s token
rows (``rlhf_fast.reference.linear_token_divergence`` in float64 on those rows, with its
autograd), d weight on `lm_head`'s vocab rows and the reduced loss over all rows (both
models' float64 logits a chunk of rows at a time, the divergence's gradient w.r.t. the
student's logits by autograd of ``reference.token_divergence``, then ``dz[:, S]^T h``);
each for the upstream gradient its provider gets (random per token, or 1 on Liger's
reduced loss). Relative 2-norm error <= 2e-2 (`lm_head.TOLERANCE`). The reference's
logits are exact, a provider's rounded to bf16 (eager's; rlhf_fast's and Liger's where
their GEMM has no fp32 output, as on the CPU): a divergence's gradient is a difference
of two distributions, so that rounding costs about 1.2% of d hidden and d weight at the
quick shapes (fp32 logits: 0.2%, the gradients' own bf16 rounding), and the divergence
itself 0.03-0.3%.

Roofline: ``floor_flops`` = (fwd 2, fwd+bwd 4) GEMMs of 2 N V D FLOPs (both models'
logits; then the student's d hidden and d weight) over the measured bf16 GEMM rate, as
in the ``linear_logprobs`` suite; ``gemms`` as counted above.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import cases, gates, lm_head, objectives, peers
from rlhf_fast.benchmarks.cases import Case
from rlhf_fast.benchmarks.lm_head import DTYPE, IGNORE_INDEX, TOLERANCE

OP = "linear_token_divergence"
#: (N, D, V): the ``linear_logprobs`` suite's headline shapes, both models that wide.
GPU_SHAPES = [(8192, 4096, 128256), (16384, 3584, 151936)]
#: The second quick shape is large enough for the gate's row and vocab subsets.
QUICK_SHAPES = [(32, 16, 100), (320, 64, 3000)]
MODES = lm_head.MODES
VARIANTS = objectives.DIVERGENCES
#: `rlhf-fast bench --headline` runs jsd only: the divergences run the same GEMMs, and
#: jsd's elementwise work is the most (its forward kernel reads each row pair twice).
HEADLINE_VARIANTS = ("jsd",)
#: The teacher's lm_head scale over the student's (its logits' std ~4 against ~3).
TEACHER_SCALE = 4.0 / 3.0
IGNORED_FRACTION = 0.03
#: Providers returning the loss reduced over the counted rows (sum / their count).
REDUCED = ("liger",)
#: GEMMs of 2 N V D FLOPs each provider runs, and the floor.
GEMMS = {"fwd": {"rlhf_fast": 2, "eager": 2, "compile": 2, "liger": 3},
         "fwd+bwd": {"rlhf_fast": 6, "eager": 4, "compile": 4, "liger": 4}}
FLOOR_GEMMS = {"fwd": 2, "fwd+bwd": 4}


# --------------------------------------------------------------------------- providers

#: Every provider's signature: (student hidden, student weight, teacher hidden, teacher
#: weight, labels, divergence) -> the divergence per token ``[N]`` (0 at ignored rows),
#: or for the ones in REDUCED the reduced loss.
DivergenceFn = Callable[..., torch.Tensor]


def rlhf_fast_linear_divergence(hidden: torch.Tensor, weight: torch.Tensor,
                                teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                                labels: torch.Tensor, divergence: str) -> torch.Tensor:
    return rlhf_fast.linear_token_divergence(
        hidden, weight, teacher_hidden, teacher_weight, labels, ignore_index=IGNORE_INDEX,
        **objectives.divergence_options(divergence))


def eager_linear_divergence(hidden: torch.Tensor, weight: torch.Tensor,
                            teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                            labels: torch.Tensor, divergence: str) -> torch.Tensor:
    """Both models' bf16 logits materialised, then TRL's GKD divergence per token."""
    student = hidden @ weight.T
    with torch.no_grad():
        teacher = teacher_hidden @ teacher_weight.T
    return objectives.eager_divergence(student, teacher, labels, divergence)


def _compiled_eager(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                    teacher_weight: torch.Tensor, labels: torch.Tensor,
                    divergence: str) -> torch.Tensor:
    """``torch.compile`` of ``eager``, one compiled copy per divergence: each sees (shapes
    x grad / no grad) = 4 graphs, under dynamo's per-function graph limit."""
    return peers.compiled(eager_linear_divergence, divergence)(
        hidden, weight, teacher_hidden, teacher_weight, labels, divergence)


LIGER = peers.Entry("liger", "liger_kernel.transformers", "LigerFusedLinearJSD")


def liger_linear_divergence(loss_cls: Any) -> DivergenceFn:
    """Liger-Kernel's fused linear JSD, one module per divergence (its beta): the loss
    reduced, sum over the counted rows / their count."""
    losses = {variant: loss_cls(jsd_beta=objectives.PEER_BETA[variant],
                                ignore_index=IGNORE_INDEX)
              for variant in VARIANTS}

    def run(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
            teacher_weight: torch.Tensor, labels: torch.Tensor,
            divergence: str) -> torch.Tensor:
        return losses[divergence](hidden, weight, teacher_hidden, teacher_weight, labels)

    return run


PROVIDERS = {
    "rlhf_fast": rlhf_fast_linear_divergence,
    "eager": eager_linear_divergence,
    "compile": _compiled_eager,
    "liger": cases.peer(liger_linear_divergence, LIGER),
}


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """One case's tensors (never written) and the per-token upstream gradient ``g``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    labels: torch.Tensor
    g: torch.Tensor

    def args(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A provider's tensors, with `hidden` and `weight` in place of the student's."""
        return (hidden, weight, self.teacher_hidden, self.teacher_weight, self.labels)


def make_inputs(shape: tuple[int, int, int], device: torch.device) -> Inputs:
    """Seeded inputs (module docstring), the same for every provider and divergence."""
    n, d, v = shape
    gen = torch.Generator(device=device).manual_seed(1234)
    hidden = torch.randn((n, d), generator=gen, device=device).to(DTYPE)
    weight = lm_head.lm_head(v, d, gen)
    teacher_hidden = torch.randn((n, d), generator=gen, device=device).to(DTYPE)
    teacher_weight = lm_head.lm_head(v, d, gen).mul_(TEACHER_SCALE)
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    ignored = torch.rand(n, generator=gen, device=device) < IGNORED_FRACTION
    ignored[n // 2] = True
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    g = torch.randn(n, generator=gen, device=device)
    return Inputs(hidden, weight, teacher_hidden, teacher_weight, labels, g)


# --------------------------------------------------------------------------- reference


@dataclasses.dataclass(frozen=True)
class DivergenceReference:
    """float64 results on the gate's subsets (kept on the CPU): the divergence on the
    token rows, the loss reduced as Liger reduces it, and d hidden / d weight for each
    upstream gradient (``token``: the random g per token; ``reduced``: 1 on the loss)."""

    rows: torch.Tensor
    value: torch.Tensor
    loss: torch.Tensor
    token: lm_head.Reference
    reduced: lm_head.Reference


def compute_reference(inp: Inputs, divergence: str) -> DivergenceReference:
    """The float64 reference of `inp` for `divergence` (module docstring's gate)."""
    options = objectives.divergence_options(divergence)
    rows = gates.gate_rows(inp.labels, IGNORE_INDEX, spread=lm_head.GATE_ROWS,
                           all_rows=lm_head.GATE_ALL_ROWS)
    vocab = lm_head.gate_vocab(inp.labels, inp.weight.shape[0])
    counted = inp.labels != IGNORE_INDEX
    n_counted = counted.sum().clamp(min=1).double()
    with torch.no_grad():
        w_student, w_teacher = inp.weight.double(), inp.teacher_weight.double()

    # the token rows: the reference op itself, row-wise, so the subset is exact
    h = inp.hidden[rows].double().requires_grad_(True)
    value = reference.linear_token_divergence(
        h, w_student, inp.teacher_hidden[rows].double(), w_teacher, inp.labels[rows],
        ignore_index=IGNORE_INDEX, **options)
    g = inp.g[rows].double()
    (dh_token,) = torch.autograd.grad(value, h, g, retain_graph=True)
    (dh_reduced,) = torch.autograd.grad(value, h, torch.ones_like(g) / n_counted)

    # every counted token, a chunk of rows at a time: the loss and d weight on `vocab`
    dims = (vocab.shape[0], inp.weight.shape[1])
    dw_token = torch.zeros(dims, dtype=torch.float64, device=inp.weight.device)
    dw_reduced = torch.zeros_like(dw_token)
    total = torch.zeros((), dtype=torch.float64, device=inp.weight.device)
    step = max(1, gates.REF_CHUNK_ELEMENTS // inp.weight.shape[0])
    for start in range(0, inp.labels.shape[0], step):
        keep = counted[start:start + step]
        h_chunk = inp.hidden[start:start + step][keep].double()
        z_student = (h_chunk @ w_student.T).requires_grad_(True)
        with torch.no_grad():
            z_teacher = inp.teacher_hidden[start:start + step][keep].double() @ w_teacher.T
        per_row = reference.token_divergence(z_student, z_teacher, **options)
        (dz,) = torch.autograd.grad(per_row.sum(), z_student)  # each row's own gradient
        total += per_row.detach().sum()
        dz = dz[:, vocab]
        dw_token += (dz * inp.g[start:start + step][keep].double()[:, None]).T @ h_chunk
        dw_reduced += dz.T @ h_chunk
        del z_student, z_teacher, per_row, dz
    del w_student, w_teacher

    def grads(d_hidden: torch.Tensor, d_weight: torch.Tensor) -> lm_head.Reference:
        return lm_head.Reference(rows, vocab, value.detach().cpu(), d_hidden.cpu(),
                                 d_weight.cpu())

    return DivergenceReference(rows, value.detach().cpu(), (total / n_counted).cpu(),
                               grads(dh_token, dw_token), grads(dh_reduced,
                                                                dw_reduced / n_counted))


#: Reference per (shape, divergence, device): the inputs are seeded, every provider
#: shares it.
_references: dict[tuple[tuple[int, int, int], str, str], DivergenceReference] = {}


def reference_outputs(case: Case, inp: Inputs) -> DivergenceReference:
    """`compute_reference` of `inp` (made by ``make_inputs(case.shape, ...)``), once per
    (shape, divergence)."""
    key = (case.shape, case.variant, str(inp.hidden.device))
    if key not in _references:
        _references[key] = compute_reference(inp, case.variant)
    return _references[key]


# --------------------------------------------------------------------------- one case


def _gate(case: Case, inp: Inputs, fn: DivergenceFn) -> tuple[bool, dict[str, float]]:
    """Run the provider once; compare its divergence per token (Liger: its reduced loss)
    and, in fwd+bwd, d hidden and d weight with the float64 reference."""
    ref = reference_outputs(case, inp)
    backward = case.mode != "fwd"
    reduced = case.provider in REDUCED
    hidden = inp.hidden.detach().requires_grad_(backward)
    weight = inp.weight.detach().requires_grad_(backward)
    out = fn(*inp.args(hidden, weight), case.variant)
    errors: dict[str, float] = {}
    if reduced:
        ok, errors["loss"] = gates.check_close(out, ref.loss, TOLERANCE)
    elif tuple(out.shape) != tuple(inp.labels.shape):
        errors["divergence"] = float("inf")
        return False, errors
    else:
        ok, errors["divergence"] = gates.check_close(out[ref.rows], ref.value, TOLERANCE)
    if backward:
        d_hidden, d_weight = torch.autograd.grad(out, (hidden, weight),
                                                 None if reduced else inp.g)
        del out
        good, more = lm_head.check_grads(d_hidden, d_weight,
                                         ref.reduced if reduced else ref.token)
        errors.update(more)
        ok &= good
    return ok, errors


def _timed(case: Case, inp: Inputs, fn: DivergenceFn) -> cases.Timed:
    """`lm_head.timed_from_hidden` with the case's divergence, a random upstream gradient
    per token (Liger's reduced loss: 1)."""
    grads = None if case.provider in REDUCED else inp.g
    return lm_head.timed_from_hidden(case, inp, lambda *args: fn(*args, case.variant), grads)


SUITE = cases.Suite(
    OP, cases.sizes(GPU_SHAPES, DTYPE), cases.sizes(QUICK_SHAPES, DTYPE), MODES, PROVIDERS,
    variants=VARIANTS,
    make_inputs=lambda case, device: make_inputs(case.shape, device),
    gate=_gate,
    timed=_timed,
    columns=lm_head.gemm_columns(
        gemms=lambda case: GEMMS[case.mode][case.provider],
        floor_gemms=lambda case: FLOOR_GEMMS[case.mode],
        tokens=lambda case: case.shape[0],
    ),
    roofline="gemm",
    budget=lambda case: lm_head.BUDGET,
    describe=lambda case, inp: {"counted_tokens": int((inp.labels != IGNORE_INDEX).sum())},
    headline_variants=HEADLINE_VARIANTS,
)


def test_linear_token_divergence(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
