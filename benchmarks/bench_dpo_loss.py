"""Benchmark of `rlhf_fast.dpo_loss` on its path from the logits of a stacked chosen /
rejected batch.

The objective (`objectives`): sigmoid DPO (beta 0.1, reduction mean) of B preference pairs. Inputs:
logits ``[2B, T, V]`` bf16 (rows 0..B-1 the chosen answers, B..2B-1 the rejected ones),
labels ``[2B, T]`` int64 with the prompt (a random 10-30% prefix, shared by the two
answers of a pair) and the right padding set to -100, and the reference model's sequence
log-probs ``ref_chosen`` / ``ref_rejected`` ``[B]`` fp32, constants (precomputed, as a
trainer with precomputed reference log-probs has them; drawn so that beta times the
margin is O(1)). The usual causal shift: ``logits[:, :-1]`` predicts ``labels[:, 1:]``.

Providers (same inputs, same process):

* ``rlhf_fast``: ``tok = rlhf_fast.logprobs(logits, shifted)`` with ``shifted =
  F.pad(labels[:, 1:], (0, 1), value=-100)`` (the labels shifted onto the whole logits,
  the last position ignored: no slice backward), ``seq =
  rlhf_fast.sequence_logps(tok, shifted != -100)``,
  ``rlhf_fast.dpo_loss(seq[:B], seq[B:], ref_chosen, ref_rejected, beta=0.1).loss``.
* ``rlhf_fast-inplace``: the same with ``logprobs(..., inplace_backward=True)``
  (backward modes only; the forward is identical). Its backward overwrites the logits, so
  every timed call gets a fresh copy of them, made untimed before the call.
* ``eager``: as TRL-style trainers write it: ``logits[:, :-1].float().log_softmax(-1)``,
  ``gather`` on the labels with -100 replaced by 0, masked sum per row, then
  ``-F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()``.
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Liger-Kernel's DPO loss starts from hidden states (a fused linear layer), not logits: it
is benchmarked against ``linear_dpo_loss`` in the ``linear_dpo_loss`` suite.

Modes: ``fwd`` (logits not requiring grad: the loss only), ``bwd`` (the backward alone;
the forward building its graph runs untimed before each call) and ``fwd+bwd``
(``torch.autograd.grad`` of the loss w.r.t. the whole ``[2B, T, V]`` logits; for the
peers autograd's slicing backward scatters the ``[:, :-1]`` gradient into a new tensor of
the logits' shape; rlhf_fast's kernel writes it whole, and the in-place provider into
the logits themselves).

Every provider is first checked against a float64 reference built from
``rlhf_fast.reference`` (``logprobs``, ``sequence_logps``, ``dpo_loss``) on the same
inputs: the reference sequence log-probs are computed chunk by chunk (at most
``gates.REF_CHUNK_ELEMENTS`` logits at a time: never a float64 copy of the logits)
and the loss is compared; in the backward modes the logits gradient is compared on every
sequence where there are at most ``GATE_GRAD_SEQS`` (4), else on 4 of them (first and
last chosen, first and last rejected), again chunk by chunk, the last position (it
predicts nothing: gradient 0) included. Relative error <= 1e-2 (bf16 logits). A
provider that does not match is reported "wrong" and not timed; one that runs out of
GPU memory is reported as skipped for that reason (eager at T = 4096 is expected to).

Bytes-moved floor (GB/s column), the model of the logprobs suite, with N = 2B * (T - 1)
the rows of ``logits[:, :-1]``: ``fwd`` reads the bf16 logits once, 2 N V bytes;
``bwd`` reads them once and writes the bf16 gradient once, 4 N V; ``fwd+bwd`` both,
6 N V bytes. Everything else (labels, per-token and per-sequence log-probs) is O(N) and
not counted. Every row is counted, the prompt and padding rows (label -100) too, whose
logits a kernel need not read (each row's ``answer_tokens`` in the JSON says how many
rows are read): the fraction of copy bandwidth is taken on this dense model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import cases, gates, objectives
from rlhf_fast.benchmarks.cases import Case
from rlhf_fast.benchmarks.inputs import random_logits
from rlhf_fast.benchmarks.objectives import IGNORE_INDEX

OP = "dpo_loss"
DTYPE = torch.bfloat16
#: (pairs B, tokens T, vocab V); the logits are [2B, T, V]. GPU: 8 pairs, Llama 3 vocab
#: (T = 4096 is 16.8 GB of logits).
GPU_SHAPES = [(8, 1024, 128256), (8, 4096, 128256)]
QUICK_SHAPES = [(2, 16, 64), (4, 128, 4099)]
MODES = tuple(cases.LOGITS_PASSES)
#: Providers that write into the logits: a fresh copy, made untimed, before every call.
OVERWRITE_LOGITS = ("rlhf_fast-inplace",)
#: Relative-error tolerance of the correctness gate (bf16 logits, as the logprobs suite).
TOLERANCE = 1e-2
#: Sequences whose logits gradient is compared when there are more than this many.
GATE_GRAD_SEQS = 4
#: Std of (policy - reference) sequence log-prob per answer: beta * margin is O(1).
MARGIN_STD = 10.0


def logits_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The logits' shape ``[2B, T, V]`` of the size (B pairs, T, V)."""
    pairs, t, v = shape
    return (2 * pairs, t, v)


# --------------------------------------------------------------------------- providers


def _rlhf_fast(inplace: bool) -> Callable[..., torch.Tensor]:
    def run(
        logits: torch.Tensor,
        labels: torch.Tensor,
        ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor,
    ) -> torch.Tensor:
        # labels shifted onto the whole logits (the last position ignored): no slice
        # backward, the kernel writes the logits' gradient whole
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        tok = rlhf_fast.logprobs(logits, shifted, ignore_index=IGNORE_INDEX,
                                 inplace_backward=inplace)
        seq = rlhf_fast.sequence_logps(tok, shifted != IGNORE_INDEX)
        return objectives.dpo_objective(rlhf_fast.dpo_loss, seq, ref_chosen, ref_rejected)

    return run


def eager_dpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """The DPO loss from logits as TRL-style trainers write it (fp32 log_softmax)."""
    seq = objectives.eager_sequence_logps(logits[:, :-1], labels[:, 1:])
    return objectives.eager_dpo_objective(seq, ref_chosen, ref_rejected)


PROVIDERS = {
    "rlhf_fast": _rlhf_fast(inplace=False),
    "rlhf_fast-inplace": _rlhf_fast(inplace=True),
    **cases.eager_and_compiled(eager_dpo_loss),
}


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """One case's tensors. ``logits`` is never written: in-place providers get copies."""

    logits: torch.Tensor
    labels: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    #: float64 reference sequence log-probs of the policy, ``[2B]`` (for the gate).
    policy_ref64: torch.Tensor

    def args(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A provider's arguments, with `logits` in place of the case's."""
        return (logits, self.labels, self.ref_chosen, self.ref_rejected)


def reference_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 ``[2B]`` reference sequence log-probs, chunk by chunk (no float64 copy of
    the logits; position t predicts labels[:, t + 1])."""
    targets = labels[:, 1:]
    tok = gates.reference_token_logps(logits, targets)
    return reference.sequence_logps(tok, targets != IGNORE_INDEX)


#: The policy's float64 reference sequence log-probs per (shape, device): one chunked float64
#: pass over the logits per shape, not per provider (the inputs are seeded).
_policy_ref64: dict[tuple[tuple[int, int, int], str], torch.Tensor] = {}


def make_inputs(shape: tuple[int, int, int], device: torch.device) -> Inputs:
    """Random logits (std 2, one sequence at a time: no fp32 copy of the whole tensor),
    per-pair prompt lengths, right-padded answers (one full-length answer on each side),
    and reference log-probs within ~MARGIN_STD of the policy's."""
    pairs, t, v = shape
    rows = 2 * pairs
    gen = torch.Generator(device=device).manual_seed(1234)
    logits = random_logits(logits_shape(shape), DTYPE, gen)
    labels = objectives.pair_labels(pairs, t, v, gen)

    key = (shape, str(device))
    if key not in _policy_ref64:
        _policy_ref64[key] = reference_sequence_logps(logits, labels)
    policy_ref64 = _policy_ref64[key]
    margin = torch.randn(rows, generator=gen, device=device, dtype=torch.float64) * MARGIN_STD
    ref = (policy_ref64 - margin).float()
    return Inputs(logits, labels, ref[:pairs].clone(), ref[pairs:].clone(), policy_ref64)


# --------------------------------------------------------------------------- one case


def _gate_seqs(rows: int) -> list[int]:
    """Sequences whose gradient is compared: all, or the first and last of each side."""
    if rows <= GATE_GRAD_SEQS:
        return list(range(rows))
    pairs = rows // 2
    return [0, pairs - 1, pairs, rows - 1]


def _gate(
    case: Case, inp: Inputs, fn: Callable[..., torch.Tensor]
) -> tuple[bool, dict[str, float]]:
    """Run the provider once; compare the loss (and logits grad) with the float64
    reference: d loss / d seq times d seq / d logits, chunk by chunk."""
    backward = case.mode != "fwd"
    seq = inp.policy_ref64.detach().clone().requires_grad_(backward)
    ref_loss = objectives.dpo_objective(
        reference.dpo_loss, seq, inp.ref_chosen.double(), inp.ref_rejected.double()
    )
    targets = inp.labels[:, 1:]

    def backprop(g_seq: torch.Tensor, row: int, start: int, stop: int, tok: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        part = reference.sequence_logps(tok, targets[row, start:stop] != IGNORE_INDEX)
        return part, g_seq[row]

    return gates.gate_loss_from_logits(
        inp.logits, run=lambda x: fn(*inp.args(x)),
        fresh=case.provider in OVERWRITE_LOGITS, backward=backward, ref_loss=ref_loss,
        ref_wrt=seq, targets=targets, seqs=_gate_seqs(inp.logits.shape[0]),
        backprop=backprop, tol=TOLERANCE,
    )


SUITE = cases.logits_loss_suite(
    OP, GPU_SHAPES, QUICK_SHAPES, DTYPE, PROVIDERS, make_inputs, logits_shape=logits_shape,
    gate=_gate, overwrite=OVERWRITE_LOGITS,
    describe=lambda case, inp: {"answer_tokens": int((inp.labels[:, 1:] != IGNORE_INDEX).sum())},
)


def test_dpo_loss(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
