"""Benchmark of the DPO loss straight from hidden states: `rlhf_fast.linear_dpo_loss`.

The objective of the ``dpo`` suite (sigmoid DPO, beta 0.1, mean over B pairs) with a
reference model, from hidden states instead of logits: the policy's last hidden states
``[2B, T, D]`` bf16 (rows 0..B-1 the chosen answers, B..2B-1 the rejected ones) and
lm_head ``[V, D]`` bf16, the frozen reference's hidden states and lm_head (the policy's
plus noise: margins O(1)), labels ``[2B, T]`` aligned with the positions (hidden[:, t]
predicts labels[:, t]) with the prompt (a random 10-30% prefix shared by a pair) and the
right padding set to -100. Neither model's ``[2B T, V]`` logits need ever exist.

Providers (same inputs, same process):

* ``rlhf_fast``: the reference's sequence log-probs under ``torch.no_grad``
  (``rlhf_fast.linear_logprobs`` + ``sequence_logps``), then
  ``rlhf_fast.linear_dpo_loss(hidden, weight, labels, labels != -100, ref_chosen,
  ref_rejected, beta=0.1).loss``. GEMMs of 2 N V D: fwd 2 (policy, reference), fwd+bwd
  5 (the DPO loss couples a pair's tokens, so the backward recomputes the logits: 4 for
  the policy, 1 for the reference).
* ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss(beta=0.1, compiled=<on CUDA>)``
  called with the reference's hidden states and lm_head (it has no precomputed-reference
  input): chunks of pairs through ``torch.func``, the policy's gradient computed in its
  forward even when nothing requires grad: 4 GEMMs in both modes. Pure PyTorch, so it
  runs on the CPU too; skipped, with the reason, where not installed.
* ``eager``: materialised logits of both models (the reference's under no_grad), fp32
  ``log_softmax``, ``gather``, masked sums, ``-logsigmoid(beta * margin).mean()``: 2 / 4.
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Modes: ``fwd`` (nothing requires grad) and ``fwd+bwd`` (``torch.autograd.grad`` of the
loss w.r.t. the policy's hidden states and lm_head).

No ``bwd`` mode: the fused providers split the work between forward and backward
differently (Liger and the fused losses compute gradients in the forward), so a
backward-alone time would compare different work; ``fwd+bwd`` is the comparable number.

Correctness gate, with the machinery of the ``linear_logprobs`` suite: float64 sequence
log-probs of both models (``reference.linear_logprobs`` a chunk of rows at a time) give
the float64 loss (``reference.dpo_loss``) and its gradient w.r.t. each policy sequence
log-prob, hence w.r.t. each answer token's log-prob; d hidden and d weight are those of
``sum g * logp``, compared on the linear_logprobs suite's row and vocab subsets.
Relative error <= 2e-2. A provider that does not match is reported "wrong", not timed.

Roofline: ``floor_flops`` = (fwd 2, fwd+bwd 4) GEMMs of 2 N V D FLOPs (N = 2B T) over the
measured bf16 GEMM rate, as in the linear_logprobs suite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import bench_dpo, bench_linear_grpo, bench_linear_logprobs, harness

OP = "linear_dpo"
IGNORE_INDEX = -100
DTYPE = torch.bfloat16
BETA = bench_dpo.BETA
#: (pairs B, T, D, V): 2B T = 8192 tokens through a Llama-3-8B-sized lm_head and 16384
#: through a Qwen2-7B-width one (the linear_logprobs suite's shapes).
GPU_SHAPES = [(4, 1024, 4096, 128256), (8, 1024, 3584, 151936)]
QUICK_SHAPES = [(2, 8, 16, 100), (2, 80, 64, 3000)]
PROVIDERS = ("rlhf_fast", "liger", "eager", "compile")
MODES = ("fwd", "fwd+bwd")
TOLERANCE = bench_linear_logprobs.TOLERANCE
LIGER_ENTRY = ("liger", "liger_kernel.chunked_loss", "LigerFusedLinearDPOLoss")
#: GEMMs of 2 N V D FLOPs each provider runs (policy + reference), and the floor.
GEMMS = {
    "rlhf_fast": {"fwd": 2, "fwd+bwd": 5},
    "liger": {"fwd": 4, "fwd+bwd": 4},
    "eager": {"fwd": 2, "fwd+bwd": 4},
    "compile": {"fwd": 2, "fwd+bwd": 4},
}
FLOOR_GEMMS = {"fwd": 2, "fwd+bwd": 4}
#: Std of the reference's hidden states around the policy's (beta * margin is O(1)).
REF_HIDDEN_NOISE = 0.05


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: shape (B pairs, T, D, V), mode and provider."""

    shape: tuple[int, int, int, int]
    mode: str
    provider: str

    @property
    def id(self) -> str:
        b, t, d, v = self.shape
        return f"{2 * b}x{t}x{d}x{v}-bf16-{self.mode}-{self.provider}"


def cases(quick: bool) -> list[Case]:
    """All cases, in table order: shape, mode, provider."""
    return [
        Case(shape, mode, provider)
        for shape in (QUICK_SHAPES if quick else GPU_SHAPES)
        for mode in MODES
        for provider in PROVIDERS
    ]


# --------------------------------------------------------------------------- providers

#: Every provider's signature: (hidden, weight, labels, ref_hidden, ref_weight) -> loss.
LossFn = Callable[..., torch.Tensor]


def rlhf_fast_linear_dpo(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
) -> torch.Tensor:
    mask = labels != IGNORE_INDEX
    with torch.no_grad():
        ref_tok = rlhf_fast.linear_logprobs(ref_hidden, ref_weight, labels)
        ref_seq = rlhf_fast.sequence_logps(ref_tok, mask)
    pairs = labels.shape[0] // 2
    return rlhf_fast.linear_dpo_loss(
        hidden, weight, labels, mask, ref_seq[:pairs], ref_seq[pairs:], beta=BETA
    ).loss


def _eager_sequence_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    mask = labels != IGNORE_INDEX
    log_p = (hidden @ weight.T).float().log_softmax(-1)
    tok = log_p.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def eager_linear_dpo(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
) -> torch.Tensor:
    """Both models' logits materialised, then the dpo suite's eager loss."""
    with torch.no_grad():
        ref_seq = _eager_sequence_logps(ref_hidden, ref_weight, labels)
    seq = _eager_sequence_logps(hidden, weight, labels)
    pairs = labels.shape[0] // 2
    margin = (seq[:pairs] - ref_seq[:pairs]) - (seq[pairs:] - ref_seq[pairs:])
    return -F.logsigmoid(BETA * margin).mean()


def _eager_fwd(*args: torch.Tensor) -> torch.Tensor:
    return eager_linear_dpo(*args)


def _eager_fwd_bwd(*args: torch.Tensor) -> torch.Tensor:
    return eager_linear_dpo(*args)


def compiled_linear_dpo(mode: str) -> LossFn:
    """``torch.compile`` of ``eager``, one function per mode: each sees the GPU shapes only
    (dynamo's per-function graph limit, see ``harness.compiled``)."""
    return harness.compiled(_eager_fwd if mode == "fwd" else _eager_fwd_bwd)


def liger_linear_dpo(loss_cls: Any, device: torch.device) -> LossFn:
    """Liger-Kernel's chunked fused linear DPO loss, the reference model computed inside."""
    loss_fn = loss_cls(beta=BETA, ignore_index=IGNORE_INDEX, compiled=device.type == "cuda")

    def run(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ref_hidden: torch.Tensor,
        ref_weight: torch.Tensor,
    ) -> torch.Tensor:
        out = loss_fn(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)
        return out[0] if isinstance(out, tuple) else out  # (loss, aux outputs)

    return run


def provider_fn(provider: str, mode: str, device: torch.device) -> LossFn:
    if provider == "rlhf_fast":
        return rlhf_fast_linear_dpo
    if provider == "eager":
        return eager_linear_dpo
    if provider == "compile":
        return compiled_linear_dpo(mode)
    entry = harness.require_peer(*LIGER_ENTRY, device, runs=harness.Runs.ANY_DEVICE)
    return liger_linear_dpo(entry, device)


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why `provider` cannot run on `device` (None when it can)."""
    if provider == "compile" and device.type != "cuda":
        return "torch.compile skipped in CPU quick mode"
    if provider == "liger":
        return harness.peer_entry(*LIGER_ENTRY, device, runs=harness.Runs.ANY_DEVICE)[1]
    return None


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """One case's tensors (never written) and the float64 reference of the gate."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    loss64: torch.Tensor
    grads: bench_linear_logprobs.Reference

    def args(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (hidden, weight, self.labels, self.ref_hidden, self.ref_weight)


#: (loss64, grads) per (shape, device): the inputs are seeded, every provider shares it.
_references: dict[tuple[tuple[int, ...], str], tuple[torch.Tensor, Any]] = {}


def make_inputs(shape: tuple[int, int, int, int], device: torch.device) -> Inputs:
    """Seeded inputs (hidden / weight scaled as in the linear_logprobs suite; the dpo
    suite's prompt and padding layout) and their float64 reference, once per shape."""
    pairs, t, d, v = shape
    rows = 2 * pairs
    gen = torch.Generator(device=device).manual_seed(1234)
    hidden = torch.randn((rows, t, d), generator=gen, device=device)
    ref_hidden = hidden + REF_HIDDEN_NOISE * torch.randn(
        (rows, t, d), generator=gen, device=device
    )
    hidden, ref_hidden = hidden.to(DTYPE), ref_hidden.to(DTYPE)
    weight = torch.randn((v, d), generator=gen, device=device)
    weight = weight.mul_(bench_linear_logprobs.LOGIT_STD / d**0.5).to(DTYPE)
    ref_weight = weight.clone()  # a frozen copy of the policy's lm_head

    labels = bench_dpo.pair_labels(pairs, t, v, gen)

    key = (shape, str(device))
    if key not in _references:
        _references[key] = _reference(hidden, weight, labels, ref_hidden, ref_weight)
    loss64, grads = _references[key]
    return Inputs(hidden, weight, labels, ref_hidden, ref_weight, loss64, grads)


def _reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
) -> tuple[torch.Tensor, bench_linear_logprobs.Reference]:
    """The float64 loss, and d hidden / d weight on the linear_logprobs gate's subsets."""
    mask = labels != IGNORE_INDEX
    tok64 = bench_linear_grpo.reference_token_logps(hidden, weight, labels)
    ref_tok64 = bench_linear_grpo.reference_token_logps(ref_hidden, ref_weight, labels)
    seq64 = reference.sequence_logps(tok64, mask).requires_grad_(True)
    ref_seq64 = reference.sequence_logps(ref_tok64, mask)
    pairs = labels.shape[0] // 2
    loss64 = reference.dpo_loss(
        seq64[:pairs], seq64[pairs:], ref_seq64[:pairs], ref_seq64[pairs:], beta=BETA
    ).loss
    (g_seq,) = torch.autograd.grad(loss64, seq64)
    # d loss / d logp of an answer token is its sequence's g: the linear_logprobs gate's
    # reference with that upstream gradient (prompt and padding: ignored).
    g_tok = g_seq.unsqueeze(1).expand_as(tok64) * mask
    flat = bench_linear_logprobs.Inputs(
        hidden.flatten(0, 1), weight, labels.flatten(), g_tok.flatten()
    )
    return loss64.detach(), bench_linear_logprobs.compute_reference(flat)


# --------------------------------------------------------------------------- one case


def flop_columns(case: Case, median_ms: float, rate: float) -> dict[str, Any]:
    b, t, d, v = case.shape
    return harness.gemm_roofline_columns(
        gemms=GEMMS[case.provider][case.mode], floor_gemms=FLOOR_GEMMS[case.mode],
        gemm_flops=2 * (2 * b * t) * v * d, median_ms=median_ms, rate=rate,
    )


def run_case(case: Case, session: Any, benchmark: Any) -> tuple[dict[str, Any], str | None]:
    """Gate and time one case. Returns its row and the pytest outcome to raise (or None).

    All tensors live in this frame, so they are freed before the caller raises a
    skip / xfail / fail (whose traceback would otherwise keep gigabytes alive).
    """
    device = session.device
    b, t, d, v = case.shape
    row_args = dict(
        op=OP, shape=(2 * b, t, d, v), dtype=DTYPE, provider=case.provider, mode=case.mode
    )
    reason = unavailable(case.provider, device)
    if reason is not None:
        return harness.make_row(status=harness.status_skipped(reason), **row_args), "skip"

    rate = harness.gemm_rate(str(device))  # before this case allocates its inputs
    inp = make_inputs(case.shape, device)
    row_args["answer_tokens"] = int((inp.labels != IGNORE_INDEX).sum())
    return harness.gate_and_time(
        benchmark=benchmark, device=device, row_args=row_args,
        group=f"{OP} {case.id.removesuffix('-' + case.provider)}",
        provider=lambda: provider_fn(case.provider, case.mode, device),
        gate=lambda fn: bench_linear_grpo.gate_loss_from_hidden(case, inp, fn),
        prepare=lambda fn: (bench_linear_grpo.timed_loss_from_hidden(case, inp, fn), None),
        columns=lambda timing: flop_columns(case, timing["median_ms"], rate),
        time_kwargs=dict(warmup_ms=bench_linear_logprobs.WARMUP_MS,
                         rep_ms=bench_linear_logprobs.REP_MS),
    )


def test_linear_dpo(case: Case, bench_session: Any, benchmark: Any) -> None:
    row, outcome = run_case(case, bench_session, benchmark)
    bench_session.add(row)
    harness.report_outcome(row, outcome, case.provider)
