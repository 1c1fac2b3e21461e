"""Benchmark of `rlhf_fast.logprobs` against what a user would write instead.

Providers (same inputs, same process):

* ``rlhf_fast``: ``rlhf_fast.logprobs``.
* ``rlhf_fast-inplace``: the same with ``inplace_backward=True`` (backward modes only;
  the forward is identical). Its logits are overwritten by the gradient, so every timed
  call gets a fresh copy of them, made untimed before the call.
* ``eager``: as trainers write it: an fp32 copy of the logits, ``log_softmax``,
  ``gather``; entropy ``-(softmax * log_softmax).sum(-1)``.
* ``eager-chunked``: the memory-saving variant (TRL's, before its kernels):
  ``log_softmax`` + ``gather`` per chunk of rows (one sequence's worth) in the input
  dtype, entropy per chunk of 128 rows.
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).
* ``liger``: Liger-Kernel's ``LigerCrossEntropyLoss(reduction="none")``, logp = -loss
  (returned in the logits' dtype). Log-prob only: it has no entropy output, so its
  ``logp+entropy`` rows are skipped. It writes into its input: the ignored rows' logits
  are zeroed even in a no-grad forward, and when the logits require grad its forward
  stores the gradient in them (its backward then multiplies that by the upstream
  gradient into a new tensor). So, like ``rlhf_fast-inplace``, it gets a fresh copy of
  the logits, made untimed, before every timed call, in every mode.
  Runs on CUDA, or under TRITON_INTERPRET=1; skipped, with the reason, where missing.
* ``trl``: TRL's helpers from ``trl.trainer.utils`` as its trainers call them on the
  logits of completions: ``selective_log_softmax(logits, ids, row_mask=mask)`` for
  ``logp``, ``selective_log_softmax_and_entropy(logits, ids, row_mask=mask)`` (entropy
  differentiable, its default) for ``logp+entropy``; ids are the labels with the ignored
  rows clamped to 0, mask the non-ignored rows (TRL zeroes the masked rows' outputs and
  gradients). Both take the temperature and divide inside; every provider here runs at
  temperature 1, so it is left at its default. On CUDA both run TRL's Triton kernel (one
  pass computing log-prob and entropy, for the log-prob-only call too; fp32 outputs);
  elsewhere TRL's PyTorch fallback (row by row, ``log_softmax`` + ``gather`` in bf16,
  ``logsumexp`` in fp32; entropy per 128 rows; outputs in the input dtype), so the CPU
  rows time the fallback. Skipped, with the reason, where TRL is missing.

The eager providers zero the log-prob and entropy of ignored rows (label -100), as
`rlhf_fast.logprobs` does; trainers mask them in the loss instead, which costs the same.

Modes: ``fwd`` (logits not requiring grad, as for the old-policy / reference
log-probs), ``bwd`` (backward alone; the forward building its graph runs untimed before
each call) and ``fwd+bwd`` (``torch.autograd.grad`` with random upstream gradients for
log-prob and entropy). Every provider is first checked against ``rlhf_fast.reference``
in float64 on the same inputs (on a subset of rows at the GPU shapes); one that does not
match is reported "wrong" and not timed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import cases, gates, peers, per_token
from rlhf_fast.benchmarks.cases import Case
from rlhf_fast.benchmarks.inputs import provider_input, scaled_logits, token_labels
from rlhf_fast.benchmarks.per_token import (
    GATE_ALL_ROWS,
    GATE_ROWS,
    IGNORE_INDEX,
    TOLERANCE,
)

OP = "logprobs"
MODES = per_token.MODES
#: Providers that write into the logits when they require grad: fresh copy per call.
OVERWRITE_LOGITS = ("rlhf_fast-inplace", "liger")
#: The liger provider's entry point.
LIGER = peers.Entry("liger", "liger_kernel.transformers", "LigerCrossEntropyLoss")
#: The trl provider's entry points, log-prob only and with entropy.
TRL_ENTRIES = (
    peers.Entry("trl", "trl.trainer.utils", "selective_log_softmax"),
    peers.Entry("trl", "trl.trainer.utils", "selective_log_softmax_and_entropy"),
)
#: What a case computes: the log-probs, or the log-probs and the entropy.
VARIANTS = ("logp", "logp+entropy")
#: Sequences the eager-chunked provider splits the rows into (TRL loops per sequence).
N_SEQUENCES = 8
ENTROPY_CHUNK_ROWS = 128


def entropy(case: Case) -> bool:
    """Whether `case` asks for the entropy too."""
    return case.variant == "logp+entropy"


# --------------------------------------------------------------------------- providers

Outputs = tuple[torch.Tensor, ...]


def eager_logprobs(logits: torch.Tensor, labels: torch.Tensor, return_entropy: bool) -> Outputs:
    """Log-probs (and entropy) as TRL writes them: fp32 log_softmax of the whole tensor."""
    z = logits.float()
    log_p = z.log_softmax(-1)
    logp = log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ignored = labels == IGNORE_INDEX
    logp = logp.masked_fill(ignored, 0.0)
    if not return_entropy:
        return (logp,)
    entropy = -(z.softmax(-1) * log_p).sum(-1)
    return logp, entropy.masked_fill(ignored, 0.0)


def chunked_logprobs(logits: torch.Tensor, labels: torch.Tensor, return_entropy: bool) -> Outputs:
    """TRL-style selective log-softmax: log_softmax + gather per sequence, input dtype."""
    chunk = max(1, -(-logits.shape[0] // N_SEQUENCES))
    pieces = []
    for rows, row_labels in zip(logits.split(chunk), labels.split(chunk)):
        log_p = rows.log_softmax(-1)
        pieces.append(log_p.gather(-1, row_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1))
    ignored = labels == IGNORE_INDEX
    logp = torch.cat(pieces).float().masked_fill(ignored, 0.0)
    if not return_entropy:
        return (logp,)
    entropies = []
    for rows in logits.split(ENTROPY_CHUNK_ROWS):
        log_p = rows.log_softmax(-1)
        entropies.append(-(log_p.exp() * log_p).sum(-1))
    entropy = torch.cat(entropies).float().masked_fill(ignored, 0.0)
    return logp, entropy


def _rlhf_fast(inplace: bool) -> Callable[[torch.Tensor, torch.Tensor, bool], Outputs]:
    def run(logits: torch.Tensor, labels: torch.Tensor, return_entropy: bool) -> Outputs:
        out = rlhf_fast.logprobs(
            logits,
            labels,
            ignore_index=IGNORE_INDEX,
            return_entropy=return_entropy,
            inplace_backward=inplace,
        )
        return out if isinstance(out, tuple) else (out,)

    return run


def _compiled_eager(logits: torch.Tensor, labels: torch.Tensor, return_entropy: bool) -> Outputs:
    """``torch.compile`` of ``eager``, one variant per output set: each sees (shapes x
    dtypes x grad / no grad) = 6 graphs, under dynamo's per-function graph limit."""
    variant = "logp+entropy" if return_entropy else "logp"
    return peers.compiled(eager_logprobs, variant)(logits, labels, return_entropy)


def liger_logprobs(loss_cls: Any) -> Callable[[torch.Tensor, torch.Tensor, bool], Outputs]:
    """Liger-Kernel's cross entropy per token: logp = -loss (ignored rows give 0)."""
    loss_fn = loss_cls(ignore_index=IGNORE_INDEX, reduction="none")

    def run(logits: torch.Tensor, labels: torch.Tensor, return_entropy: bool) -> Outputs:
        if return_entropy:
            raise ValueError("Liger-Kernel's cross entropy has no entropy output")
        return (-loss_fn(logits, labels).float(),)

    return run


def trl_logprobs(
    selective_log_softmax: Any, selective_log_softmax_and_entropy: Any
) -> Callable[[torch.Tensor, torch.Tensor, bool], Outputs]:
    """TRL's helpers on the logits, masking the ignored rows as its trainers do."""

    def run(logits: torch.Tensor, labels: torch.Tensor, return_entropy: bool) -> Outputs:
        # TRL's callers pass token ids and a completion mask, never -100: its fallback
        # gathers every row before zeroing the masked ones.
        ids, mask = labels.clamp(min=0), labels != IGNORE_INDEX
        # temperature: TRL divides the logits by it inside; every provider runs at 1.
        if return_entropy:
            return tuple(selective_log_softmax_and_entropy(logits, ids, row_mask=mask))
        return (selective_log_softmax(logits, ids, row_mask=mask),)

    return run


#: Every provider's signature: (logits, labels, return_entropy) -> (logp,) or (logp, entropy).
PROVIDERS = per_token.rlhf_fast_providers(_rlhf_fast) | {
    "eager": eager_logprobs,
    "eager-chunked": chunked_logprobs,
    "compile": _compiled_eager,
    "liger": cases.peer(liger_logprobs, LIGER),
    "trl": cases.peer(trl_logprobs, *TRL_ENTRIES),
}


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """One case's tensors. ``logits`` is never written: in-place providers get copies."""

    logits: torch.Tensor
    labels: torch.Tensor
    g_logp: torch.Tensor
    g_entropy: torch.Tensor


def make_inputs(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Inputs:
    """Random logits (std 2), random labels with ~3% ignored rows, random upstream grads."""
    n, v = shape
    gen = torch.Generator(device=device).manual_seed(1234)
    logits = scaled_logits(shape, 2.0, dtype, gen)
    labels = token_labels(n, v, IGNORE_INDEX, gen)
    g_logp = torch.randn(n, generator=gen, device=device)
    g_entropy = torch.randn(n, generator=gen, device=device)
    return Inputs(logits, labels, g_logp, g_entropy)


# --------------------------------------------------------------------------- one case


def _gate(case: Case, inp: Inputs, fn: Callable[..., Outputs]) -> tuple[bool, dict[str, float]]:
    """Run the provider once and compare logp, entropy and grad with the float64 reference
    (all rows, or GATE_ROWS spread + ignored ones)."""
    rows = gates.gate_rows(inp.labels, IGNORE_INDEX, spread=GATE_ROWS, all_rows=GATE_ALL_ROWS)
    backward = case.mode != "fwd"
    ref_logits = inp.logits[rows].detach().to(torch.float64).requires_grad_(backward)
    ref = reference.logprobs(
        ref_logits, inp.labels[rows], ignore_index=IGNORE_INDEX, return_entropy=entropy(case)
    )
    ref = ref if isinstance(ref, tuple) else (ref,)
    grads = (inp.g_logp, inp.g_entropy)[: len(ref)]

    x = provider_input(inp.logits, backward, fresh=case.provider in OVERWRITE_LOGITS)
    outs = fn(x, inp.labels, entropy(case))
    names = ("logp", "entropy")
    errors: dict[str, float] = {}
    ok = len(outs) == len(ref)
    for name, out, r in zip(names, outs, ref):
        good, errors[name] = gates.check_close(out[rows], r, TOLERANCE[case.dtype])
        ok &= good
    if backward:
        (grad,) = torch.autograd.grad(outs, x, grads)
        (ref_grad,) = torch.autograd.grad(ref, ref_logits, tuple(g[rows].double() for g in grads))
        good, errors["grad"] = gates.check_close(grad[rows], ref_grad, TOLERANCE[case.dtype])
        ok &= good
    return ok, errors


def _timed(
    case: Case, inp: Inputs, fn: Callable[..., Outputs]
) -> tuple[Callable[..., Any], Callable[[], Any] | None]:
    """The timed call and its untimed per-call setup (or None) for the case's mode, with
    random upstream gradients for log-prob and entropy."""
    labels, with_entropy = inp.labels, entropy(case)
    grads = (inp.g_logp, inp.g_entropy)[: 2 if with_entropy else 1]
    return cases.timed_calls(inp.logits, lambda x: fn(x, labels, with_entropy), case.mode,
                             fresh=case.provider in OVERWRITE_LOGITS, grads=grads)


def _skip(case: Case, device: torch.device) -> str | None:
    if case.provider == "liger" and entropy(case):
        return "Liger-Kernel's cross entropy has no entropy output"
    return None


#: The floor of logits-sized traffic: fwd 1 read, bwd 1 read + 1 write, fwd+bwd 3.
SUITE = per_token.suite(OP, PROVIDERS, VARIANTS, make_inputs, gate=_gate, timed=_timed,
                        skip=_skip, logits_passes=cases.LOGITS_PASSES)


def test_logprobs(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
