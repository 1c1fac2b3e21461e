"""Benchmark of `rlhf_fast.linear_logprobs` against the ways a user gets per-token log-probs
straight from the final hidden states and the lm_head.

Inputs: bf16 ``hidden [N, D]`` and ``weight [V, D]`` scaled as `lm_head` says (logits of
std ~3), labels
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
timed): `lm_head`'s, relative 2-norm error <= 2e-2 for logp and d hidden on a subset of
token rows and d weight on a subset of vocab rows, against independent float64 results
(``rlhf_fast.reference.linear_logprobs``, and a chunked float64 pass over the vocab for
d weight), computed once per shape and reused by every provider (the inputs are seeded).

Columns: median time and IQR (``timing.time_fn``, ``lm_head.BUDGET``'s repetition budget), peak
memory above the inputs (``timing.peak_memory_above``; the fwd+bwd gradients, d weight
a full ``[V, D]``, count as outputs). There is no bytes floor (the op is GEMM-bound): GB/s
reads n/a. The roofline is FLOPs over the device's bf16 GEMM rate, measured once per
session (``gemm_rate``: a ``GEMM_RATE_SIZE``-cubed ``torch.mm`` timed with
``timing.time_fn``), stored in each row's JSON and in pytest-benchmark's ``extra_info``
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

import inspect
from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast.benchmarks import cases, gates, lm_head, peers
from rlhf_fast.benchmarks.cases import Case
from rlhf_fast.benchmarks.lm_head import DTYPE, IGNORE_INDEX, TOLERANCE, LogProbInputs

OP = "linear_logprobs"
#: Headline shapes (N, D, V): 8 x 1024 tokens through a Llama-3-8B-sized lm_head, 8 x 2048
#: through a Qwen2-7B-width one with the Qwen tokenizer's vocab (DESIGN.md's logits shapes).
GPU_SHAPES = [(8192, 4096, 128256), (16384, 3584, 151936)]
#: The second quick shape is large enough for the gate's row and vocab subsets.
QUICK_SHAPES = [(32, 16, 100), (320, 64, 3000)]
MODES = ("fwd", "fwd+bwd")
IGNORED_FRACTION = 0.1


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


#: The peers' entry points; TRL's fused head, and the vocab tile width its trainers pass.
LIGER = peers.Entry("liger", "liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
CCE = peers.Entry("cce", "cut_cross_entropy", "linear_cross_entropy")
TRL_HEAD = peers.Entry("trl", "trl.trainer.utils", "_ChunkedLogProbFunction")
TRL_CHUNK_SIZE = peers.Entry("trl", "trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE")


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


PROVIDERS = {
    "rlhf_fast": rlhf_fast_linear,
    "materialised+logprobs": materialised_logprobs,
    **cases.eager_and_compiled(eager_linear_logprobs),
    "liger": cases.peer(liger_linear_logprobs, LIGER),
    "cce": cases.peer(cce_linear_logprobs, CCE),
    "trl": cases.peer(trl_linear_logprobs, TRL_HEAD, TRL_CHUNK_SIZE),
}


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


# --------------------------------------------------------------------------- inputs


def make_inputs(shape: tuple[int, int, int], device: torch.device) -> LogProbInputs:
    """Seeded bf16 hidden / weight (logit std ~LOGIT_STD), labels with ~10% ignored, and a
    random fp32 upstream gradient. The same for every provider of a shape."""
    n, d, v = shape
    gen = torch.Generator(device=device).manual_seed(1234)
    hidden = torch.randn((n, d), generator=gen, device=device).to(DTYPE)
    weight = lm_head.lm_head(v, d, gen)
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    ignored = torch.rand(n, generator=gen, device=device) < IGNORED_FRACTION
    ignored[n // 2] = True
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    g_logp = torch.randn(n, generator=gen, device=device)
    return LogProbInputs(hidden, weight, labels, g_logp)


#: Reference per (shape, device): the inputs are seeded, so every provider shares it.
_references: dict[tuple[tuple[int, int, int], str], lm_head.Reference] = {}


def reference_outputs(shape: tuple[int, int, int], inp: LogProbInputs) -> lm_head.Reference:
    """The float64 reference of `inp` (made by ``make_inputs(shape, ...)``), once per shape."""
    key = (shape, str(inp.hidden.device))
    if key not in _references:
        _references[key] = lm_head.compute_reference(inp)
    return _references[key]


# --------------------------------------------------------------------------- one case


def _gate(case: Case, inp: LogProbInputs, fn: LogProbsFn) -> tuple[bool, dict[str, float]]:
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
    ok, errors["logp"] = gates.check_close(logp[ref.rows], ref.logp, TOLERANCE)
    if backward:
        d_hidden, d_weight = torch.autograd.grad(logp, (hidden, weight), inp.g_logp)
        del logp
        good, more = lm_head.check_grads(d_hidden, d_weight, ref)
        errors.update(more)
        ok &= good
    return ok, errors


SUITE = cases.Suite(
    OP, cases.sizes(GPU_SHAPES, DTYPE), cases.sizes(QUICK_SHAPES, DTYPE), MODES, PROVIDERS,
    make_inputs=lambda case, device: make_inputs(case.shape, device),
    gate=_gate,
    timed=lambda case, inp, fn: lm_head.timed_from_hidden(case, inp, fn, inp.g_logp),
    columns=lm_head.gemm_columns(
        gemms=lambda case: provider_gemms(case.provider, case.mode),
        floor_gemms=lambda case: lm_head.FLOOR_GEMMS[case.mode],
        tokens=lambda case: case.shape[0],
    ),
    roofline="gemm",
    budget=lambda case: lm_head.BUDGET,
)


def test_linear_logprobs(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
