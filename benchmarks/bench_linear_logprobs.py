"""Benchmark of `rlhf_fast.linear_logprobs` against the ways a user gets per-token log-probs
straight from the final hidden states and the lm_head.

Inputs: bf16 ``hidden [N, D]`` (standard normal) and ``weight [V, D]`` (normal, std
``LOGIT_STD / sqrt(D)``, so that the logits have std ~3: peaked enough that the softmax
part of the gradient is ~15% of its norm and a gate that ignored it would not pass), labels
uniform in ``[0, V)`` with ~10% set to ignore_index (-100), a random fp32 upstream gradient
``g [N]`` on the log-probs. The table's shape column is ``N x D x V``.

Providers (same inputs, same process), each returning fp32 ``logp [N]``, 0 where ignored:

* ``rlhf_fast``: ``rlhf_fast.linear_logprobs(hidden, weight, labels)``.
* ``materialised+logprobs``: ``logits = hidden @ weight.T`` in bf16, then
  ``rlhf_fast.logprobs(logits, labels, inplace_backward=True)`` (the gradient overwrites
  the logits, which nothing else needs).
* ``eager``: as trainers write it: ``(hidden @ weight.T).float().log_softmax(-1)``,
  ``gather`` of ``labels.clamp(min=0)``, ``masked_fill`` of the ignored rows.
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).
* ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss(ignore_index=-100,
  reduction="none")``, logp = -loss.
* ``cce``: cut-cross-entropy's ``linear_cross_entropy(hidden, weight, labels,
  ignore_index=-100, reduction="none")`` (its parameters are ``e, c, targets``:
  embeddings, classifier, targets), logp = -loss, its defaults otherwise (gradient
  filtering ``filter_eps="auto"``).
* ``trl``: TRL's fused LM head as ``trl.trainer.utils.add_fused_lm_head`` runs it on
  CUDA (the head every TRL trainer scores completions with): the non-ignored tokens only,
  ``hidden[mask]`` and ``labels[mask]``, through ``_ChunkedLogProbFunction.apply(hidden,
  weight, None, labels, 1.0, chunk_size, None, 1.0, ("log_probs",))`` (no bias,
  temperature 1 as every provider here, no softcap, logit scale 1, log-probs only: what
  the reference model and DPO ask for), scattered back into zeros with
  ``masked_scatter``. ``chunk_size`` is the vocab tile TRL's head passes,
  ``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`` (32768 in TRL 1.16), read from the
  installed TRL. Tiles of 4096 tokens x chunk_size go through cuBLAS; on CUDA a TRL Triton
  kernel folds each into online log-sum-exp statistics, elsewhere torch ops do (so the
  CPU rows time that fallback); the backward recomputes each tile and accumulates the
  gradient GEMMs in fp32.

Liger and CCE run only where they are importable, on CUDA (Liger also in the Triton
interpreter, TRITON_INTERPRET=1, which is how CI checks its adapter); TRL wherever it is
importable. Otherwise their rows say "skipped" and why. Their ignored rows are zeroed by
the wrapper, as trainers mask them.

Modes: ``fwd`` (hidden and weight not requiring grad: old-policy / reference log-probs)
and ``fwd+bwd`` (``torch.autograd.grad(logp, (hidden, weight), g)``).

No ``bwd`` mode: the fused providers split the work between forward and backward
differently (Liger and the fused losses compute gradients in the forward), so a
backward-alone time would compare different work; ``fwd+bwd`` is the comparable number.

Correctness gate (before any timing; a provider that fails it is reported "wrong" and not
timed; relative 2-norm error <= 2e-2 for every output):

* logp and d hidden: against ``rlhf_fast.reference.linear_logprobs`` in float64 (and its
  autograd for d hidden) on a subset of token rows: all rows up to 256 tokens, otherwise
  64 spread rows plus a few ignored ones. Both are row-wise, so the subset is exact.
* d weight: sums over all N tokens, and a float64 ``[N, V]`` does not fit at the GPU
  shapes. It is computed in float64 for a subset of vocab rows S (all of V up to 2048,
  otherwise 512 spread rows, the first and last included, plus the labels of 512 tokens so
  that the one-hot term is checked): ``dW[S] = (g * (onehot(y)[:, S] - exp(z[:, S] -
  lse)))^T h`` over the non-ignored tokens, where ``lse`` comes from one chunked float64
  pass over the whole vocab (float64 copies of one vocab chunk of ``weight`` at a time,
  ``REF_CHUNK_ELEMENTS`` logits at once). An independent float64 result, not another
  provider's, at the cost of one float64 GEMM of the full size; it is computed once per
  shape and reused by every provider (the inputs are seeded). The reference logits are not
  rounded to bf16, so the gate also measures each provider's bf16 logit rounding (~0.2%
  of d hidden at this logit scale).

Columns: median time and IQR (``harness.time_fn``, a ``REP_MS`` repetition budget), peak
memory above the inputs (``harness.peak_memory_above``; the fwd+bwd gradients, d weight
a full ``[V, D]``, count as outputs). There is no bytes floor (the op is GEMM-bound): GB/s
reads n/a. The roofline is FLOPs over the device's bf16 GEMM rate, measured once per
session (``gemm_rate``: a ``GEMM_RATE_SIZE``-cubed ``torch.mm`` timed with
``harness.time_fn``), stored in each row's JSON and in pytest-benchmark's ``extra_info``
(the markdown table has no column for it):

* ``gemms``: the GEMMs of ``2 N V D`` FLOPs the provider runs. rlhf_fast: fwd 1, fwd+bwd 4
  (the backward recomputes the logits, then d weight and d hidden). materialised, eager,
  compile: fwd 1, fwd+bwd 3 (logits kept for the backward). liger: fwd 1; fwd+bwd 3 in
  the releases that compute the gradient during the forward, 4 in those that, with
  ``reduction="none"``, defer it to a backward that recomputes the logits (detected from
  the signature of ``fused_linear_cross_entropy_forward``). The former scale the gradient
  by ``grad_output[0]`` only, so with a per-token upstream gradient they fail the gate.
  cce: fwd 1 (the log-sum-exp; the label dot product is negligible), fwd+bwd 4 (its
  backward recomputes the logits blockwise, then d hidden and d weight), counted nominal
  although gradient filtering may skip blocks. trl: fwd 1, fwd+bwd 4 (its backward
  recomputes each tile), counted over all N tokens although it projects only the
  non-ignored ones (~90% here).
* ``tflops`` = gemms * 2 N V D / median time; ``frac_gemm_rate`` = tflops over the
  measured GEMM rate (``gemm_rate_tflops``): how fast the provider runs its own GEMMs.
* ``floor_flops`` = the GEMMs any implementation must run (fwd 1, fwd+bwd 3) * 2 N V D;
  ``frac_roofline`` = floor_flops / GEMM rate / median time: comparable across providers,
  as the copy-bandwidth fraction is for the memory-bound ops.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import harness

OP = "linear_logprobs"
IGNORE_INDEX = -100
DTYPE = torch.bfloat16
#: Headline shapes (N, D, V): 8 x 1024 tokens through a Llama-3-8B-sized lm_head, 8 x 2048
#: through a Qwen2-7B-width one with the Qwen tokenizer's vocab (DESIGN.md's logits shapes).
GPU_SHAPES = [(8192, 4096, 128256), (16384, 3584, 151936)]
#: The second quick shape is large enough for the gate's row and vocab subsets.
QUICK_SHAPES = [(32, 16, 100), (320, 64, 3000)]
PROVIDERS = ("rlhf_fast", "materialised+logprobs", "eager", "compile", "liger", "cce", "trl")
MODES = ("fwd", "fwd+bwd")
TOLERANCE = 2e-2
LOGIT_STD = 3.0
IGNORED_FRACTION = 0.1
#: Token rows compared against the float64 reference when there are more than GATE_ALL_ROWS.
GATE_ROWS = 64
GATE_ALL_ROWS = 256
#: Vocab rows of d weight compared when V > GATE_ALL_VOCAB: spread rows + labelled rows.
GATE_VOCAB_SPREAD = 512
GATE_VOCAB_LABELS = 512
GATE_ALL_VOCAB = 2048
#: float64 logits alive at once in the reference's log-sum-exp pass (512 MiB).
REF_CHUNK_ELEMENTS = 1 << 26
#: do_bench budgets (ms): a GPU-shape call takes ~50-150 ms, so the default 200 ms
#: repetition budget would time only 1-2 calls.
WARMUP_MS = 100
REP_MS = 1500
#: GEMMs of 2 N V D FLOPs any implementation must run, per mode.
FLOOR_GEMMS = {"fwd": 1, "fwd+bwd": 3}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: shape (N, D, V), mode and provider."""

    shape: tuple[int, int, int]
    mode: str
    provider: str

    @property
    def id(self) -> str:
        n, d, v = self.shape
        return f"{n}x{d}x{v}-bf16-{self.mode}-{self.provider}"


def cases(quick: bool) -> list[Case]:
    """All cases, in table order: shape, mode, provider."""
    return [
        Case(shape, mode, provider)
        for shape in (QUICK_SHAPES if quick else GPU_SHAPES)
        for mode in MODES
        for provider in PROVIDERS
    ]


# --------------------------------------------------------------------------- providers

LogProbsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rlhf_fast_linear(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                     ) -> torch.Tensor:
    """``rlhf_fast.linear_logprobs``: the logits never exist whole."""
    return rlhf_fast.linear_logprobs(hidden, weight, labels, ignore_index=IGNORE_INDEX)


def materialised_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                          ) -> torch.Tensor:
    """bf16 logits from the lm_head, then ``rlhf_fast.logprobs`` with in-place backward."""
    logits = hidden @ weight.T
    return rlhf_fast.logprobs(logits, labels, ignore_index=IGNORE_INDEX, inplace_backward=True)


def eager_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                          ) -> torch.Tensor:
    """As trainers write it: fp32 log_softmax of the bf16 logits, gather, mask."""
    log_p = (hidden @ weight.T).float().log_softmax(-1)
    logp = log_p.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logp.masked_fill(labels == IGNORE_INDEX, 0.0)


def _eager_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return eager_linear_logprobs(hidden, weight, labels)


def _eager_fwd_bwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                   ) -> torch.Tensor:
    return eager_linear_logprobs(hidden, weight, labels)


def compiled_linear_logprobs(mode: str) -> LogProbsFn:
    """``torch.compile`` of ``eager``, one function per mode: each sees the GPU shapes only
    (dynamo's per-function graph limit, see ``harness.compiled``)."""
    return harness.compiled(_eager_fwd if mode == "fwd" else _eager_fwd_bwd)


#: Each peer's entry point: (provider, module, attribute).
PEER_ENTRIES = {
    "liger": ("liger", "liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss"),
    "cce": ("cce", "cut_cross_entropy", "linear_cross_entropy"),
    "trl": ("trl", "trl.trainer.utils", "_ChunkedLogProbFunction"),
}
#: The vocab tile width TRL's fused head passes to its function.
TRL_CHUNK_SIZE_ENTRY = ("trl", "trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE")


def _peer_logp(loss: Any, labels: torch.Tensor, name: str) -> torch.Tensor:
    """logp = -loss per token, ignored rows zeroed; the loss must be per token."""
    if isinstance(loss, tuple | list):  # releases returning (loss, z_loss, ...)
        loss = loss[0]
    loss = getattr(loss, "loss", loss)  # releases returning an output dataclass
    if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != tuple(labels.shape):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{name} reduction='none' gave {shape}, not a per-token loss")
    return torch.where(labels == IGNORE_INDEX, 0.0, -loss.float())


def liger_linear_logprobs(loss_cls: Any) -> LogProbsFn:
    """Liger-Kernel's fused linear cross entropy, per token: logp = -loss."""
    loss_fn = loss_cls(ignore_index=IGNORE_INDEX, reduction="none")

    def run(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _peer_logp(loss_fn(weight, hidden, labels), labels, "liger")

    return run


def cce_linear_logprobs(linear_cross_entropy: Any) -> LogProbsFn:
    """cut-cross-entropy's linear_cross_entropy, per token: logp = -loss."""

    def run(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = linear_cross_entropy(
            hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        return _peer_logp(loss, labels, "cce")

    return run


def trl_linear_logprobs(function: Any, chunk_size: int) -> LogProbsFn:
    """TRL's fused LM head on the non-ignored tokens, zeros elsewhere (module docstring)."""
    # rlhf_fast.integrations.trl.patch_trl swaps in rlhf-fast's stand-in: not TRL's head.
    if not function.__module__.startswith("trl."):
        raise RuntimeError(f"trl's fused head is patched by {function.__module__}")

    def run(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mask = labels != IGNORE_INDEX
        logp = function.apply(hidden[mask], weight, None, labels[mask], 1.0, chunk_size,
                              None, 1.0, ("log_probs",))[0]
        return logp.new_zeros(labels.shape).masked_scatter(mask, logp)

    return run


def provider_fn(provider: str, mode: str, device: torch.device) -> LogProbsFn:
    if provider == "rlhf_fast":
        return rlhf_fast_linear
    if provider == "materialised+logprobs":
        return materialised_logprobs
    if provider == "eager":
        return eager_linear_logprobs
    if provider == "compile":
        return compiled_linear_logprobs(mode)
    entry = harness.require_peer(*PEER_ENTRIES[provider], device)
    if provider == "liger":
        return liger_linear_logprobs(entry)
    if provider == "cce":
        return cce_linear_logprobs(entry)
    return trl_linear_logprobs(entry, harness.require_peer(*TRL_CHUNK_SIZE_ENTRY, device))


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why `provider` cannot run on `device` (None when it can)."""
    if provider == "compile" and device.type != "cuda":
        return "torch.compile skipped in CPU quick mode"
    if provider in PEER_ENTRIES:
        return harness.peer_entry(*PEER_ENTRIES[provider], device)[1]
    return None


def liger_defers_gradient() -> bool:
    """Whether the installed Liger-Kernel computes the reduction="none" gradient in a
    backward that recomputes the logits (4 GEMMs) rather than during the forward (3)."""
    try:
        from liger_kernel.ops import fused_linear_cross_entropy as flce
    except Exception:  # not importable: its cases are skipped anyway
        return False
    forward = getattr(flce, "fused_linear_cross_entropy_forward", None)
    if forward is None:
        return False
    return "token_grad_output" in inspect.signature(forward).parameters


def provider_gemms(provider: str, mode: str) -> int:
    """GEMMs of 2 N V D FLOPs that `provider` runs in `mode` (see the module docstring)."""
    if mode == "fwd":
        return 1
    if provider in ("rlhf_fast", "cce", "trl"):
        return 4
    if provider == "liger":
        return 4 if liger_defers_gradient() else 3
    return 3


# --------------------------------------------------------------------------- roofline


def flop_columns(case: Case, median_ms: float, rate: float) -> dict[str, Any]:
    """The roofline fields of a timed row (see the module docstring)."""
    n, d, v = case.shape
    return harness.gemm_roofline_columns(
        gemms=provider_gemms(case.provider, case.mode), floor_gemms=FLOOR_GEMMS[case.mode],
        gemm_flops=2 * n * v * d, median_ms=median_ms, rate=rate,
    )


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """One case's tensors; never written (the providers get views requiring grad)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    g_logp: torch.Tensor


def make_inputs(shape: tuple[int, int, int], device: torch.device) -> Inputs:
    """Seeded bf16 hidden / weight (logit std ~LOGIT_STD), labels with ~10% ignored, and a
    random fp32 upstream gradient. The same for every provider of a shape."""
    n, d, v = shape
    gen = torch.Generator(device=device).manual_seed(1234)
    hidden = torch.randn((n, d), generator=gen, device=device).to(DTYPE)
    weight = torch.randn((v, d), generator=gen, device=device).mul_(LOGIT_STD / d**0.5)
    weight = weight.to(DTYPE)
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    ignored = torch.rand(n, generator=gen, device=device) < IGNORED_FRACTION
    ignored[n // 2] = True
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    g_logp = torch.randn(n, generator=gen, device=device)
    return Inputs(hidden, weight, labels, g_logp)


# --------------------------------------------------------------------------- reference


def gate_rows(labels: torch.Tensor) -> torch.Tensor:
    """Token rows compared with the reference: all, or GATE_ROWS spread + 4 ignored."""
    n = labels.shape[0]
    if n <= GATE_ALL_ROWS:
        return torch.arange(n, device=labels.device)
    spread = torch.linspace(0, n - 1, GATE_ROWS, device=labels.device).long()
    ignored = (labels == IGNORE_INDEX).nonzero().flatten()[:4]
    return torch.unique(torch.cat([spread, ignored]))


def gate_vocab(labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """Rows of d weight compared: all, or GATE_VOCAB_SPREAD spread (first and last
    included) + the labels of the first GATE_VOCAB_LABELS non-ignored tokens."""
    if vocab <= GATE_ALL_VOCAB:
        return torch.arange(vocab, device=labels.device)
    spread = torch.linspace(0, vocab - 1, GATE_VOCAB_SPREAD, device=labels.device).long()
    labelled = labels[labels != IGNORE_INDEX][:GATE_VOCAB_LABELS]
    return torch.unique(torch.cat([spread, labelled]))


def reference_weight_grad(inp: Inputs, vocab: torch.Tensor) -> torch.Tensor:
    """float64 rows `vocab` of d/d weight of ``sum_n g_n logp_n``, without an [N, V] tensor.

    ``d logp_n / d z_n = onehot(y_n) - softmax(z_n)``, so ``dW[v] = sum_n g_n (1[y_n = v]
    - exp(z_nv - lse_n)) h_n`` over the non-ignored tokens. ``lse`` needs every logit: one
    pass over vocab chunks of ``REF_CHUNK_ELEMENTS`` float64 logits; the rows `vocab` need
    ``z[:, vocab]`` only.
    """
    valid = inp.labels != IGNORE_INDEX
    h = inp.hidden[valid].double()
    labels = inp.labels[valid]
    g = inp.g_logp[valid].double()
    n_tokens, n_vocab = h.shape[0], inp.weight.shape[0]
    step = max(1, REF_CHUNK_ELEMENTS // max(n_tokens, 1))
    lse = torch.full((n_tokens,), -torch.inf, dtype=torch.float64, device=h.device)
    for start in range(0, n_vocab, step):
        z = h @ inp.weight[start : start + step].double().T
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
        del z
    z = h @ inp.weight[vocab].double().T
    d_z = (labels[:, None] == vocab[None, :]).double() - torch.exp(z - lse[:, None])
    return (d_z * g[:, None]).T @ h


@dataclasses.dataclass(frozen=True)
class Reference:
    """float64 reference outputs on the gate's subsets (kept on the CPU)."""

    rows: torch.Tensor  # token rows (on the inputs' device)
    vocab: torch.Tensor  # vocab rows of d weight (on the inputs' device)
    logp: torch.Tensor  # [rows]
    grad_hidden: torch.Tensor  # [rows, D]
    grad_weight: torch.Tensor  # [vocab, D]


#: Reference per (shape, device): the inputs are seeded, so every provider shares it.
_references: dict[tuple[tuple[int, int, int], str], Reference] = {}


def reference_outputs(shape: tuple[int, int, int], inp: Inputs) -> Reference:
    """The float64 reference of `inp` (made by ``make_inputs(shape, ...)``), once per shape."""
    key = (shape, str(inp.hidden.device))
    if key not in _references:
        _references[key] = compute_reference(inp)
    return _references[key]


def compute_reference(inp: Inputs) -> Reference:
    """float64 logp and gradients (of ``sum g_logp * logp``) on the gate's subsets."""
    rows = gate_rows(inp.labels)
    vocab = gate_vocab(inp.labels, inp.weight.shape[0])
    h = inp.hidden[rows].double().requires_grad_(True)
    with torch.no_grad():
        w = inp.weight.double()
    logp = reference.linear_logprobs(h, w, inp.labels[rows], ignore_index=IGNORE_INDEX)
    (grad_hidden,) = torch.autograd.grad(logp, h, inp.g_logp[rows].double())
    del w
    with torch.no_grad():
        grad_weight = reference_weight_grad(inp, vocab)
    return Reference(rows, vocab, logp.detach().cpu(), grad_hidden.cpu(), grad_weight.cpu())


# --------------------------------------------------------------------------- one case


def _gate(case: Case, inp: Inputs, fn: LogProbsFn) -> tuple[bool, dict[str, float]]:
    """Run the provider once; compare logp (and d hidden, d weight) with the reference."""
    ref = reference_outputs(case.shape, inp)
    backward = case.mode != "fwd"
    hidden = inp.hidden.detach().requires_grad_(backward)
    weight = inp.weight.detach().requires_grad_(backward)
    logp = fn(hidden, weight, inp.labels)
    errors: dict[str, float] = {}
    if tuple(logp.shape) != tuple(inp.labels.shape):
        errors["logp"] = float("inf")
        return False, errors
    ok, errors["logp"] = harness.check_close(logp[ref.rows], ref.logp, TOLERANCE)
    if backward:
        d_hidden, d_weight = torch.autograd.grad(logp, (hidden, weight), inp.g_logp)
        del logp
        good, errors["grad_hidden"] = harness.check_close(
            d_hidden[ref.rows], ref.grad_hidden, TOLERANCE
        )
        ok &= good
        good, errors["grad_weight"] = harness.check_close(
            d_weight[ref.vocab], ref.grad_weight, TOLERANCE
        )
        ok &= good
    return ok, errors


def _timed(case: Case, inp: Inputs, fn: LogProbsFn) -> Callable[[], Any]:
    labels = inp.labels
    if case.mode == "fwd":
        hidden, weight = inp.hidden.detach(), inp.weight.detach()
        return lambda: fn(hidden, weight, labels)
    hidden = inp.hidden.detach().requires_grad_(True)
    weight = inp.weight.detach().requires_grad_(True)
    g_logp = inp.g_logp
    return lambda: torch.autograd.grad(fn(hidden, weight, labels), (hidden, weight), g_logp)


def run_case(case: Case, session: Any, benchmark: Any) -> tuple[dict[str, Any], str | None]:
    """Gate and time one case. Returns its row and the pytest outcome to raise (or None).

    All tensors live in this frame, so they are freed before the caller raises a
    skip / xfail / fail (whose traceback would otherwise keep gigabytes alive).
    """
    device = session.device
    row_args = dict(op=OP, shape=case.shape, dtype=DTYPE, provider=case.provider, mode=case.mode)
    reason = unavailable(case.provider, device)
    if reason is not None:
        return harness.make_row(status=harness.status_skipped(reason), **row_args), "skip"

    rate = harness.gemm_rate(str(device))  # before this case allocates its inputs
    inp = make_inputs(case.shape, device)
    return harness.gate_and_time(
        benchmark=benchmark, device=device, row_args=row_args,
        group=f"{OP} {case.id.removesuffix('-' + case.provider)}",
        provider=lambda: provider_fn(case.provider, case.mode, device),
        gate=lambda fn: _gate(case, inp, fn),
        prepare=lambda fn: (_timed(case, inp, fn), None),
        columns=lambda timing: flop_columns(case, timing["median_ms"], rate),
        time_kwargs=dict(warmup_ms=WARMUP_MS, rep_ms=REP_MS),
    )


def test_linear_logprobs(case: Case, bench_session: Any, benchmark: Any) -> None:
    row, outcome = run_case(case, bench_session, benchmark)
    bench_session.add(row)
    harness.report_outcome(row, outcome, case.provider)
