"""Benchmark of the DPO loss path, from the logits of a stacked chosen / rejected batch.

The objective: sigmoid DPO (beta 0.1, reduction mean) of B preference pairs. Inputs:
logits ``[2B, T, V]`` bf16 (rows 0..B-1 the chosen answers, B..2B-1 the rejected ones),
labels ``[2B, T]`` int64 with the prompt (a random 10-30% prefix, shared by the two
answers of a pair) and the right padding set to -100, and the reference model's sequence
log-probs ``ref_chosen`` / ``ref_rejected`` ``[B]`` fp32, constants (precomputed, as a
trainer with precomputed reference log-probs has them; drawn so that beta times the
margin is O(1)). The usual causal shift: ``logits[:, :-1]`` predicts ``labels[:, 1:]``.

Providers (same inputs, same process):

* ``rlhf_fast``: ``tok = rlhf_fast.logprobs(logits[:, :-1], labels[:, 1:])`` (a strided
  view, read in place), ``seq = rlhf_fast.sequence_logps(tok, labels[:, 1:] != -100)``,
  ``rlhf_fast.dpo_loss(seq[:B], seq[B:], ref_chosen, ref_rejected, beta=0.1).loss``.
* ``rlhf_fast-inplace``: the same with ``logprobs(..., inplace_backward=True)``
  (backward modes only; the forward is identical). Its backward overwrites the logits, so
  every timed call gets a fresh copy of them, made untimed before the call.
* ``eager``: as TRL-style trainers write it: ``logits[:, :-1].float().log_softmax(-1)``,
  ``gather`` on the labels with -100 replaced by 0, masked sum per row, then
  ``-F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()``.
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Liger-Kernel's DPO loss starts from hidden states (a fused linear layer), not logits: it
is benchmarked against ``linear_dpo_loss`` in the ``linear_dpo`` suite.

Modes: ``fwd`` (logits not requiring grad: the loss only), ``bwd`` (the backward alone;
the forward building its graph runs untimed before each call) and ``fwd+bwd``
(``torch.autograd.grad`` of the loss w.r.t. the whole ``[2B, T, V]`` logits; for every
provider autograd's slicing backward scatters the ``[:, :-1]`` gradient into a new
tensor of the logits' shape, so even the in-place provider allocates one gradient).

Every provider is first checked against a float64 reference built from
``rlhf_fast.reference`` (``logprobs``, ``sequence_logps``, ``dpo_loss``) on the same
inputs: the reference sequence log-probs are computed chunk by chunk (at most
``harness.REF_CHUNK_ELEMENTS`` logits at a time: never a float64 copy of the logits)
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
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import harness

OP = "dpo"
IGNORE_INDEX = -100
BETA = 0.1
DTYPE = torch.bfloat16
#: (pairs B, tokens T, vocab V); the logits are [2B, T, V]. GPU: 8 pairs, Llama 3 vocab
#: (T = 4096 is 16.8 GB of logits).
GPU_SHAPES = [(8, 1024, 128256), (8, 4096, 128256)]
QUICK_SHAPES = [(2, 16, 64), (4, 128, 4099)]
PROVIDERS = ("rlhf_fast", "rlhf_fast-inplace", "eager", "compile")
MODES = ("fwd", "bwd", "fwd+bwd")
#: Relative-error tolerance of the correctness gate (bf16 logits, as the logprobs suite).
TOLERANCE = 1e-2
#: Sequences whose logits gradient is compared when there are more than this many.
GATE_GRAD_SEQS = 4
#: Prompt length, as a fraction of T, drawn per pair; the answers fill >= 25% of the rest.
PROMPT_FRACTION = (0.1, 0.3)
#: Std of (policy - reference) sequence log-prob per answer: beta * margin is O(1).
MARGIN_STD = 10.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: shape (B pairs, T, V), mode and provider."""

    shape: tuple[int, int, int]
    mode: str
    provider: str

    @property
    def logits_shape(self) -> tuple[int, int, int]:
        pairs, t, v = self.shape
        return (2 * pairs, t, v)

    @property
    def id(self) -> str:
        rows, t, v = self.logits_shape
        return f"{rows}x{t}x{v}-bf16-{self.mode}-{self.provider}"


def cases(quick: bool) -> list[Case]:
    """All cases, in table order: shape, mode, provider."""
    out = []
    for shape in QUICK_SHAPES if quick else GPU_SHAPES:
        for mode in MODES:
            for provider in PROVIDERS:
                if provider == "rlhf_fast-inplace" and mode == "fwd":
                    continue  # in-place only changes the backward
                out.append(Case(shape, mode, provider))
    return out


# --------------------------------------------------------------------------- providers


def _rlhf_fast(inplace: bool) -> Callable[..., torch.Tensor]:
    def run(
        logits: torch.Tensor,
        labels: torch.Tensor,
        ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor,
    ) -> torch.Tensor:
        shifted = labels[:, 1:]
        tok = rlhf_fast.logprobs(
            logits[:, :-1], shifted, ignore_index=IGNORE_INDEX, inplace_backward=inplace
        )
        seq = rlhf_fast.sequence_logps(tok, shifted != IGNORE_INDEX)
        pairs = seq.shape[0] // 2
        return rlhf_fast.dpo_loss(
            seq[:pairs], seq[pairs:], ref_chosen, ref_rejected, beta=BETA
        ).loss

    return run


def eager_dpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """The DPO loss from logits as TRL-style trainers write it (fp32 log_softmax)."""
    labels = labels[:, 1:]
    loss_mask = labels != IGNORE_INDEX
    log_p = logits[:, :-1].float().log_softmax(-1)
    token_logps = log_p.gather(-1, labels.masked_fill(~loss_mask, 0).unsqueeze(-1)).squeeze(-1)
    seq = (token_logps * loss_mask).sum(-1)
    pairs = seq.shape[0] // 2
    policy_chosen, policy_rejected = seq[:pairs], seq[pairs:]
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(BETA * margin).mean()


def _eager_fwd(*args: torch.Tensor) -> torch.Tensor:
    return eager_dpo_loss(*args)


def _eager_fwd_bwd(*args: torch.Tensor) -> torch.Tensor:
    return eager_dpo_loss(*args)


def compiled_dpo_loss(mode: str) -> Callable[..., torch.Tensor]:
    """``torch.compile`` of ``eager``, one function per mode: each sees the GPU shapes only
    (dynamo's per-function graph limit, see ``harness.compiled``)."""
    return harness.compiled(_eager_fwd if mode == "fwd" else _eager_fwd_bwd)


def provider_fn(provider: str, mode: str) -> Callable[..., torch.Tensor]:
    if provider == "rlhf_fast":
        return _rlhf_fast(inplace=False)
    if provider == "rlhf_fast-inplace":
        return _rlhf_fast(inplace=True)
    if provider == "eager":
        return eager_dpo_loss
    return compiled_dpo_loss(mode)


# --------------------------------------------------------------------------- reference


def reference_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 ``[2B]`` reference sequence log-probs, chunk by chunk (no float64 copy of
    the logits; position t predicts labels[:, t + 1])."""
    targets = labels[:, 1:]
    out = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    with torch.no_grad():
        for seq in range(logits.shape[0]):
            for start, stop, _, tok in harness.reference_logprob_chunks(
                logits, targets, seq, grad=False
            ):
                mask = targets[seq, start:stop] != IGNORE_INDEX
                out[seq] += reference.sequence_logps(tok, mask)
    return out


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


def pair_labels(pairs: int, t: int, v: int, gen: torch.Generator) -> torch.Tensor:
    """``[2B, T]`` random labels of B chosen / rejected pairs: a prompt prefix shared by a
    pair (PROMPT_FRACTION of T) and right padding set to -100, answers filling >= 25% of
    the rest, one full-length answer on each side."""
    device = gen.device
    rows = 2 * pairs
    lo, hi = (max(1, round(f * t)) for f in PROMPT_FRACTION)
    prompt = torch.randint(lo, hi + 1, (pairs,), generator=gen, device=device).repeat(2)
    answer = torch.rand(rows, generator=gen, device=device) * 0.75 + 0.25
    end = prompt + (answer * (t - prompt)).ceil().long()
    end[0] = end[pairs] = t
    pos = torch.arange(t, device=device)
    keep = (pos >= prompt.unsqueeze(1)) & (pos < end.unsqueeze(1))
    labels = torch.randint(0, v, (rows, t), generator=gen, device=device)
    return labels.masked_fill(~keep, IGNORE_INDEX)


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
    logits = torch.empty((rows, t, v), device=device, dtype=DTYPE)
    for seq in range(rows):
        noise = torch.randn((t, v), generator=gen, device=device, dtype=torch.float32)
        logits[seq].copy_(noise.mul_(2.0))
        del noise

    labels = pair_labels(pairs, t, v, gen)

    key = (shape, str(device))
    if key not in _policy_ref64:
        _policy_ref64[key] = reference_sequence_logps(logits, labels)
    policy_ref64 = _policy_ref64[key]
    margin = torch.randn(rows, generator=gen, device=device, dtype=torch.float64) * MARGIN_STD
    ref = (policy_ref64 - margin).float()
    return Inputs(logits, labels, ref[:pairs].clone(), ref[pairs:].clone(), policy_ref64)


def bytes_moved(case: Case) -> int:
    """The bf16 logits[:, :-1] read once (fwd, 2 N V), read + grad written (bwd, 4 N V),
    both (fwd+bwd, 6 N V)."""
    rows, t, v = case.logits_shape
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[case.mode]
    return passes * rows * (t - 1) * v * torch.empty((), dtype=DTYPE).element_size()


# --------------------------------------------------------------------------- one case


def _gate_seqs(rows: int) -> list[int]:
    """Sequences whose gradient is compared: all, or the first and last of each side."""
    if rows <= GATE_GRAD_SEQS:
        return list(range(rows))
    pairs = rows // 2
    return [0, pairs - 1, pairs, rows - 1]


def _grad_error(grad: torch.Tensor, inp: Inputs, g_seq: torch.Tensor) -> tuple[bool, float]:
    """``harness.check_close`` of the logits gradient on the gated sequences, accumulated
    chunk by chunk against the float64 reference (d loss / d seq times d seq / d logits)."""
    diff2 = ref2 = 0.0
    targets = inp.labels[:, 1:]
    for seq in _gate_seqs(inp.logits.shape[0]):
        for start, stop, x, tok in harness.reference_logprob_chunks(
            inp.logits, targets, seq, grad=True
        ):
            part = reference.sequence_logps(tok, targets[seq, start:stop] != IGNORE_INDEX)
            (ref_grad,) = torch.autograd.grad(part, x, g_seq[seq])
            out = grad[seq, start:stop].to(torch.float64)
            diff2 += float((out - ref_grad).square().sum())
            ref2 += float(ref_grad.square().sum())
        diff2 += float(grad[seq, -1].to(torch.float64).square().sum())  # predicts nothing
    diff, scale = math.sqrt(diff2), math.sqrt(ref2)
    err = diff / scale if scale > 0 else diff
    return bool(err <= TOLERANCE), err


def _gate(
    case: Case, inp: Inputs, fn: Callable[..., torch.Tensor]
) -> tuple[bool, dict[str, float]]:
    """Run the provider once; compare the loss (and logits grad) with the float64 reference."""
    backward = case.mode != "fwd"
    pairs = inp.ref_chosen.shape[0]
    seq = inp.policy_ref64.detach().clone().requires_grad_(backward)
    ref_loss = reference.dpo_loss(
        seq[:pairs], seq[pairs:], inp.ref_chosen.double(), inp.ref_rejected.double(), beta=BETA
    ).loss

    x = inp.logits.detach().requires_grad_(backward)
    if case.provider == "rlhf_fast-inplace":
        # a copy as an op's output (not a view of a leaf, which inplace_backward refuses);
        # autograd.grad w.r.t. x stops at x
        x = x.clone()
    loss = fn(x, inp.labels, inp.ref_chosen, inp.ref_rejected)
    errors: dict[str, float] = {}
    ok, errors["loss"] = harness.check_close(loss, ref_loss, TOLERANCE)
    if backward:
        (grad,) = torch.autograd.grad(loss, x)
        del x, loss  # the in-place provider's copy now holds its gradient
        (g_seq,) = torch.autograd.grad(ref_loss, seq)
        good, errors["grad"] = _grad_error(grad, inp, g_seq)
        ok &= good
    return ok, errors


def _timed(
    case: Case, inp: Inputs, fn: Callable[..., torch.Tensor]
) -> tuple[Callable[..., Any], Callable[[], Any] | None]:
    """The timed call and its untimed per-call setup (or None) for the case's mode."""
    args = (inp.labels, inp.ref_chosen, inp.ref_rejected)
    if case.mode == "fwd":
        logits = inp.logits.detach()
        return (lambda: fn(logits, *args)), None

    fresh = case.provider == "rlhf_fast-inplace"
    leaf = None if fresh else inp.logits.detach().requires_grad_(True)

    def new_leaf() -> torch.Tensor:  # the fresh copy is not a leaf: see _gate
        return inp.logits.detach().requires_grad_(True).clone() if fresh else leaf

    if case.mode == "bwd":  # the forward building the graph runs untimed before each call

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            x = new_leaf()
            return fn(x, *args), x

        return (lambda state: torch.autograd.grad(*state)), forward

    def fwd_bwd(x: torch.Tensor) -> Any:
        return torch.autograd.grad(fn(x, *args), x)

    if fresh:
        return fwd_bwd, new_leaf
    return (lambda: fwd_bwd(leaf)), None


def run_case(case: Case, session: Any, benchmark: Any) -> tuple[dict[str, Any], str | None]:
    """Gate and time one case. Returns its row and the pytest outcome to raise (or None).

    All tensors live in this frame, so they are freed before the caller raises a
    skip / xfail / fail (whose traceback would otherwise keep gigabytes alive).
    """
    device = session.device
    row_args = dict(
        op=OP, shape=case.logits_shape, dtype=DTYPE, provider=case.provider, mode=case.mode
    )
    if case.provider == "compile" and device.type != "cuda":
        reason = "torch.compile skipped in CPU quick mode"
        return harness.make_row(status=harness.status_skipped(reason), **row_args), "skip"

    inp = make_inputs(case.shape, device)
    row_args["answer_tokens"] = int((inp.labels[:, 1:] != IGNORE_INDEX).sum())
    return harness.gate_and_time(
        benchmark=benchmark, device=device, row_args=row_args,
        group=f"{OP} {case.id.removesuffix('-' + case.provider)}",
        provider=lambda: provider_fn(case.provider, case.mode),
        gate=lambda fn: _gate(case, inp, fn),
        prepare=lambda fn: _timed(case, inp, fn),
        columns=lambda timing: dict(bytes_moved=bytes_moved(case),
                                    copy_bandwidth=session.copy_bandwidth),
    )


def test_dpo(case: Case, bench_session: Any, benchmark: Any) -> None:
    row, outcome = run_case(case, bench_session, benchmark)
    bench_session.add(row)
    harness.report_outcome(row, outcome, case.provider)
