"""The correctness gate's tools: a provider is timed only after its outputs match the
float64 reference (`rlhf_fast.reference`) on the same inputs.

`check_close` is the measure (relative 2-norm error). The rest computes the reference
without a float64 copy of gigabytes of logits: chunk by chunk, or on a subset of rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.benchmarks.inputs import provider_input


def check_close(
    out: torch.Tensor | None, ref: torch.Tensor | None, tol: float
) -> tuple[bool, float]:
    """Relative error ``||out - ref|| / ||ref||`` (2-norms, float64) and whether <= tol.

    Where ``||ref|| == 0`` the absolute error ``||out||`` is used. A shape mismatch, a
    missing output or a NaN gives ``(False, inf or nan)``.
    """
    if out is None or ref is None:
        return False, math.inf
    if tuple(out.shape) != tuple(ref.shape):
        return False, math.inf
    o = out.detach().to(device="cpu", dtype=torch.float64)
    r = ref.detach().to(device="cpu", dtype=torch.float64)
    diff = float(torch.linalg.vector_norm(o - r))
    scale = float(torch.linalg.vector_norm(r))
    err = diff / scale if scale > 0 else diff
    return bool(err <= tol), err


def forward_gate(reference_fn: Callable[..., Any], args: Sequence[str],
                 outputs: Sequence[str], tol: float
                 ) -> Callable[[Any, dict[str, torch.Tensor], Callable[..., Any]],
                               tuple[bool, dict[str, float]]]:
    """The gate of a forward-only op whose inputs are a dict: the provider's outputs on
    ``inputs[a] for a in args`` against `reference_fn` on the same tensors in float64
    (floating ones upcast, the mask as it is), by output name (`outputs`: one name for an
    op returning a tensor, several for one returning a tuple)."""

    @torch.no_grad()
    def gate(case: Any, inputs: dict[str, torch.Tensor], fn: Callable[..., Any]
             ) -> tuple[bool, dict[str, float]]:
        tensors = [inputs[a] for a in args]
        ref = reference_fn(*(t.double() if t.is_floating_point() else t for t in tensors))
        out = fn(*tensors)
        if len(outputs) == 1:
            ref, out = (ref,), (out,)
        ok, errors = len(out) == len(outputs), {}
        for name, o, r in zip(outputs, out, ref):
            good, errors[name] = check_close(o, r, tol)
            ok &= good
        return ok, errors

    return gate


def gradient_gate(reference_fn: Callable[..., Any], args: Sequence[str], output: str,
                  wrt: str, tol: float
                  ) -> Callable[[Any, dict[str, torch.Tensor], Callable[..., Any]],
                                tuple[bool, dict[str, float]]]:
    """`forward_gate` of an op with one output, and in a backward mode its gradient
    w.r.t. ``inputs[wrt]`` for the upstream gradient ``inputs["upstream"]``, against
    `reference_fn`'s in float64."""
    forward = forward_gate(reference_fn, args, (output,), tol)

    def gate(case: Any, inputs: dict[str, torch.Tensor], fn: Callable[..., Any]
             ) -> tuple[bool, dict[str, float]]:
        ok, errors = forward(case, inputs, fn)
        if case.mode == "fwd":
            return ok, errors
        grads = []
        for call, wide in ((fn, False), (reference_fn, True)):
            tensors = {a: inputs[a].double() if wide and inputs[a].is_floating_point()
                       else inputs[a] for a in args}
            x = tensors[wrt].detach().requires_grad_()
            out = call(*(x if a == wrt else tensors[a] for a in args))
            upstream = inputs["upstream"].double() if wide else inputs["upstream"]
            grads.append(torch.autograd.grad(out, x, upstream)[0])
        good, errors[f"grad_{wrt}"] = check_close(*grads, tol)
        return ok and good, errors

    return gate


def gate_rows(labels: torch.Tensor, ignore_index: int, *, spread: int = 64,
              all_rows: int = 256) -> torch.Tensor:
    """Token rows compared with the reference: all of them up to `all_rows`, otherwise
    `spread` rows spread over them plus the first 4 ignored ones (label `ignore_index`)."""
    n = labels.shape[0]
    if n <= all_rows:
        return torch.arange(n, device=labels.device)
    rows = torch.linspace(0, n - 1, spread, device=labels.device).long()
    ignored = (labels == ignore_index).nonzero().flatten()[:4]
    return torch.unique(torch.cat([rows, ignored]))


#: Logits (elements) converted to float64 at a time by `reference_logprob_chunks`
#: (256 MiB), so a gate never makes a float64 copy of gigabytes of logits.
REF_CHUNK_ELEMENTS = 2**25


def reference_logprob_chunks(
    logits: torch.Tensor, targets: torch.Tensor, seq: int, *, grad: bool, ignore_index: int = -100
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The float64 reference log-probs of sequence `seq`, chunk by chunk.

    logits ``[rows, P', V]`` with ``P' >= P``, targets ``[rows, P]`` int64: position t
    predicts ``targets[seq, t]`` (callers pass shifted labels). Yields ``(start, stop,
    x, logp)``: the float64 leaf ``x = logits[seq, start:stop]`` (requiring grad when
    `grad`) and ``reference.logprobs(x, targets[seq, start:stop])``, at most
    ``REF_CHUNK_ELEMENTS`` logits per chunk.
    """
    positions, vocab = targets.shape[1], logits.shape[-1]
    step = max(1, REF_CHUNK_ELEMENTS // vocab)
    for start in range(0, positions, step):
        stop = min(start + step, positions)
        x = logits[seq, start:stop].detach().to(torch.float64).requires_grad_(grad)
        yield start, stop, x, reference.logprobs(
            x, targets[seq, start:stop], ignore_index=ignore_index
        )


def reference_token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 ``[rows, P]`` reference log-probs of `targets` (aligned with the first P
    positions of `logits`), chunk by chunk."""
    out = torch.zeros(targets.shape, dtype=torch.float64, device=targets.device)
    with torch.no_grad():
        for seq in range(targets.shape[0]):
            for start, stop, _, tok in reference_logprob_chunks(
                logits, targets, seq, grad=False
            ):
                out[seq, start:stop] = tok
    return out


#: (outputs, grad_outputs) whose gradient w.r.t. one chunk's logits is the reference's:
#: called with (sequence, start, stop, the chunk's float64 reference log-probs).
Backprop = Callable[[int, int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def logits_grad_error(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                      seqs: Iterable[int], backprop: Backprop, tol: float
                      ) -> tuple[bool, float]:
    """`check_close` of a provider's logits gradient `grad` on the sequences `seqs`,
    accumulated chunk by chunk against the float64 reference (`reference_logprob_chunks`
    of `logits` and `targets`, differentiated through `backprop`). Each sequence's last
    position predicts nothing: its gradient must be 0, and counts as error."""
    diff2 = ref2 = 0.0
    for seq in seqs:
        for start, stop, x, tok in reference_logprob_chunks(logits, targets, seq, grad=True):
            outputs, upstream = backprop(seq, start, stop, tok)
            (ref_grad,) = torch.autograd.grad(outputs, x, upstream)
            out = grad[seq, start:stop].to(torch.float64)
            diff2 += float((out - ref_grad).square().sum())
            ref2 += float(ref_grad.square().sum())
        diff2 += float(grad[seq, -1].to(torch.float64).square().sum())  # predicts nothing
    diff, scale = math.sqrt(diff2), math.sqrt(ref2)
    err = diff / scale if scale > 0 else diff
    return bool(err <= tol), err


def gate_loss_from_logits(
    logits: torch.Tensor,
    *,
    run: Callable[[torch.Tensor], torch.Tensor],
    fresh: bool,
    backward: bool,
    ref_loss: torch.Tensor,
    ref_wrt: torch.Tensor,
    targets: torch.Tensor,
    seqs: Iterable[int],
    backprop: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    tol: float,
) -> tuple[bool, dict[str, float]]:
    """Run a provider of a loss from `logits` once, ``run(x)`` (x: `provider_input` of
    the logits, a copy where `fresh`), and compare its loss with the float64 `ref_loss`;
    where `backward`, its logits gradient too, on the sequences `seqs`
    (`logits_grad_error`; ``backprop(g, seq, start, stop, tok)`` with g the gradient of
    `ref_loss` w.r.t. the float64 log-probs `ref_wrt` it was computed from)."""
    x = provider_input(logits, backward, fresh)
    loss = run(x)
    errors: dict[str, float] = {}
    ok, errors["loss"] = check_close(loss, ref_loss, tol)
    if backward:
        (grad,) = torch.autograd.grad(loss, x)
        del x, loss  # an overwriting provider's copy now holds its gradient
        (g,) = torch.autograd.grad(ref_loss, ref_wrt)
        good, errors["grad"] = logits_grad_error(grad, logits, targets, seqs,
                                                 functools.partial(backprop, g), tol)
        ok &= good
    return ok, errors
