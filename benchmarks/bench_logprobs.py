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
from rlhf_fast.benchmarks import harness

OP = "logprobs"
IGNORE_INDEX = -100
#: Headline shapes (DESIGN.md): 8 sequences of 1024 tokens (Qwen vocab) and of 2048 (Llama 3).
GPU_SHAPES = [((8 * 1024, 151936), torch.bfloat16), ((8 * 2048, 128256), torch.bfloat16)]
QUICK_SHAPES = [
    ((64, 1000), torch.bfloat16),
    ((128, 4099), torch.bfloat16),
    ((128, 4099), torch.float32),
]
PROVIDERS = ("rlhf_fast", "rlhf_fast-inplace", "eager", "eager-chunked", "compile", "liger",
             "trl")
#: Providers that write into the logits when they require grad: fresh copy per call.
OVERWRITE_LOGITS = ("rlhf_fast-inplace", "liger")
#: The liger provider's entry point: (peer, module, attribute).
LIGER_ENTRY = ("liger", "liger_kernel.transformers", "LigerCrossEntropyLoss")
#: The trl provider's entry points, log-prob only and with entropy.
TRL_ENTRIES = (
    ("trl", "trl.trainer.utils", "selective_log_softmax"),
    ("trl", "trl.trainer.utils", "selective_log_softmax_and_entropy"),
)
MODES = ("fwd", "bwd", "fwd+bwd")
#: Relative-error tolerance of the correctness gate, per input dtype.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
#: Rows compared against the float64 reference when there are more than GATE_ALL_ROWS.
GATE_ROWS = 64
GATE_ALL_ROWS = 256
#: Sequences the eager-chunked provider splits the rows into (TRL loops per sequence).
N_SEQUENCES = 8
ENTROPY_CHUNK_ROWS = 128


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: inputs, outputs asked for, mode and provider."""

    shape: tuple[int, int]
    dtype: torch.dtype
    entropy: bool
    mode: str
    provider: str

    @property
    def variant(self) -> str:
        return "logp+entropy" if self.entropy else "logp"

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.shape[0]}x{self.shape[1]}-{dtype}-{self.variant}-{self.mode}-{self.provider}"


def cases(quick: bool) -> list[Case]:
    """All cases, in table order: shape, outputs, mode, provider."""
    out = []
    for shape, dtype in QUICK_SHAPES if quick else GPU_SHAPES:
        for entropy in (False, True):
            for mode in MODES:
                for provider in PROVIDERS:
                    if provider == "rlhf_fast-inplace" and mode == "fwd":
                        continue  # in-place only changes the backward
                    out.append(Case(shape, dtype, entropy, mode, provider))
    return out


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


def _eager_logp(logits: torch.Tensor, labels: torch.Tensor) -> Outputs:
    return eager_logprobs(logits, labels, False)


def _eager_logp_entropy(logits: torch.Tensor, labels: torch.Tensor) -> Outputs:
    return eager_logprobs(logits, labels, True)


def _compiled_eager(logits: torch.Tensor, labels: torch.Tensor, return_entropy: bool) -> Outputs:
    """``torch.compile`` of ``eager``, one function per output set: each sees (shapes x
    dtypes x grad / no grad) = 6 variants, under dynamo's per-function graph limit."""
    target = _eager_logp_entropy if return_entropy else _eager_logp
    return harness.compiled(target)(logits, labels)


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


def provider_fn(
    provider: str, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor, bool], Outputs]:
    if provider == "liger":
        return liger_logprobs(harness.require_peer(*LIGER_ENTRY, device))
    if provider == "trl":
        return trl_logprobs(*(harness.require_peer(*entry, device) for entry in TRL_ENTRIES))
    return PROVIDER_FNS[provider]


PROVIDER_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor, bool], Outputs]] = {
    "rlhf_fast": _rlhf_fast(inplace=False),
    "rlhf_fast-inplace": _rlhf_fast(inplace=True),
    "eager": eager_logprobs,
    "eager-chunked": chunked_logprobs,
    "compile": _compiled_eager,
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
    logits = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    logits = logits.mul_(2.0).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    ignored = torch.rand(n, generator=gen, device=device) < 0.03
    ignored[n // 2] = True
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    g_logp = torch.randn(n, generator=gen, device=device)
    g_entropy = torch.randn(n, generator=gen, device=device)
    return Inputs(logits, labels, g_logp, g_entropy)


def bytes_moved(shape: tuple[int, int], dtype: torch.dtype, mode: str) -> int:
    """The floor of logits-sized traffic: fwd 1 read, bwd 1 read + 1 write, fwd+bwd 3."""
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
    return passes * shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------- one case


def _gate_rows(labels: torch.Tensor) -> torch.Tensor:
    """Rows compared against the float64 reference: all, or GATE_ROWS spread + ignored."""
    n = labels.shape[0]
    if n <= GATE_ALL_ROWS:
        return torch.arange(n, device=labels.device)
    spread = torch.linspace(0, n - 1, GATE_ROWS, device=labels.device).long()
    ignored = (labels == IGNORE_INDEX).nonzero().flatten()[:4]
    return torch.unique(torch.cat([spread, ignored]))


def _gate(case: Case, inp: Inputs, fn: Callable[..., Outputs]) -> tuple[bool, dict[str, float]]:
    """Run the provider once and compare logp, entropy and grad with the float64 reference."""
    rows = _gate_rows(inp.labels)
    backward = case.mode != "fwd"
    ref_logits = inp.logits[rows].detach().to(torch.float64).requires_grad_(backward)
    ref = reference.logprobs(
        ref_logits, inp.labels[rows], ignore_index=IGNORE_INDEX, return_entropy=case.entropy
    )
    ref = ref if isinstance(ref, tuple) else (ref,)
    grads = (inp.g_logp, inp.g_entropy)[: len(ref)]

    if case.provider in OVERWRITE_LOGITS:
        # a copy as an op's output (not a leaf, which inplace_backward refuses): clone()
        # of a detached alias requiring grad; autograd.grad w.r.t. x stops at x
        x = inp.logits.detach().requires_grad_(backward).clone()
    else:
        x = inp.logits.detach().requires_grad_(backward)
    outs = fn(x, inp.labels, case.entropy)
    names = ("logp", "entropy")
    errors: dict[str, float] = {}
    ok = len(outs) == len(ref)
    for name, out, r in zip(names, outs, ref):
        good, errors[name] = harness.check_close(out[rows], r, TOLERANCE[case.dtype])
        ok &= good
    if backward:
        (grad,) = torch.autograd.grad(outs, x, grads)
        (ref_grad,) = torch.autograd.grad(ref, ref_logits, tuple(g[rows].double() for g in grads))
        good, errors["grad"] = harness.check_close(grad[rows], ref_grad, TOLERANCE[case.dtype])
        ok &= good
    return ok, errors


def _timed(
    case: Case, inp: Inputs, fn: Callable[..., Outputs]
) -> tuple[Callable[..., Any], Callable[[], Any] | None]:
    """The timed call and its untimed per-call setup (or None) for the case's mode."""
    labels, entropy = inp.labels, case.entropy
    grads = (inp.g_logp, inp.g_entropy)[: 2 if entropy else 1]

    fresh = case.provider in OVERWRITE_LOGITS
    if case.mode == "fwd":
        if fresh:
            return (lambda x: fn(x, labels, entropy)), lambda: inp.logits.detach().clone()
        logits = inp.logits.detach()
        return (lambda: fn(logits, labels, entropy)), None

    leaf = None if fresh else inp.logits.detach().requires_grad_(True)

    def new_leaf() -> torch.Tensor:  # the fresh copy is not a leaf: see _gate
        return inp.logits.detach().requires_grad_(True).clone() if fresh else leaf

    if case.mode == "fwd+bwd":

        def fwd_bwd(x: torch.Tensor) -> Any:
            return torch.autograd.grad(fn(x, labels, entropy), x, grads)

        if fresh:
            return fwd_bwd, new_leaf
        return (lambda: fwd_bwd(leaf)), None

    def build_graph() -> tuple[torch.Tensor, Outputs]:
        x = new_leaf()
        return x, fn(x, labels, entropy)

    def bwd(state: tuple[torch.Tensor, Outputs]) -> Any:
        x, outs = state
        return torch.autograd.grad(outs, x, grads)

    return bwd, build_graph



def unavailable(case: Case, device: torch.device) -> str | None:
    """Why `case` cannot run on `device` (None when it can)."""
    if case.provider == "compile" and device.type != "cuda":
        return "torch.compile skipped in CPU quick mode"
    if case.provider == "liger":
        reason = harness.peer_entry(*LIGER_ENTRY, device)[1]
        if reason is None and case.entropy:
            return "Liger-Kernel's cross entropy has no entropy output"
        return reason
    if case.provider == "trl":
        reasons = (harness.peer_entry(*entry, device)[1] for entry in TRL_ENTRIES)
        return next((reason for reason in reasons if reason is not None), None)
    return None


def run_case(case: Case, session: Any, benchmark: Any) -> tuple[dict[str, Any], str | None]:
    """Gate and time one case. Returns its row and the pytest outcome to raise (or None).

    All tensors live in this frame, so they are freed before the caller raises a
    skip / xfail / fail (whose traceback would otherwise keep gigabytes alive).
    """
    device = session.device
    row_args = dict(
        op=OP,
        shape=case.shape,
        dtype=case.dtype,
        provider=case.provider,
        mode=case.mode,
        variant=case.variant,
    )
    reason = unavailable(case, device)
    if reason is not None:
        return harness.make_row(status=harness.status_skipped(reason), **row_args), "skip"

    inp = make_inputs(case.shape, case.dtype, device)
    return harness.gate_and_time(
        benchmark=benchmark, device=device, row_args=row_args,
        group=f"{OP} {case.id.removesuffix('-' + case.provider)}",
        provider=lambda: provider_fn(case.provider, device),
        gate=lambda fn: _gate(case, inp, fn),
        prepare=lambda fn: _timed(case, inp, fn),
        columns=lambda timing: dict(
            bytes_moved=bytes_moved(case.shape, case.dtype, case.mode),
            copy_bandwidth=session.copy_bandwidth,
        ),
    )


def test_logprobs(case: Case, bench_session: Any, benchmark: Any) -> None:
    row, outcome = run_case(case, bench_session, benchmark)
    bench_session.add(row)
    harness.report_outcome(row, outcome, case.provider)
