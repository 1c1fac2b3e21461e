"""What the suites from hidden states and an lm_head share (``linear_logprobs``,
``linear_ppo_loss``, ``linear_dpo_loss``): the inputs' scale, the float64 gate of d hidden
and d weight without an ``[N, V]`` float64 tensor, the timed calls, the GEMM roofline.

Inputs: bf16 hidden states (standard normal) and lm_head ``weight [V, D]`` (normal, std
``LOGIT_STD / sqrt(D)``, so that the logits have std ~3: peaked enough that the softmax
part of the gradient is ~15% of its norm and a gate that ignored it would not pass).

The gate (relative 2-norm error <= ``TOLERANCE`` for every output):

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
  provider's, at the cost of one float64 GEMM of the full size. The reference logits are
  not rounded to bf16, so the gate also measures each provider's bf16 logit rounding
  (~0.2% of d hidden at this logit scale).

A loss's gate reduces to that one: its float64 gradient ``g`` w.r.t. each token's log-prob
makes d hidden and d weight those of ``sum g * logp`` (`compute_reference` with ``g``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.benchmarks import gates, timing
from rlhf_fast.benchmarks.cases import Budget, Case, Shape, Suite, sizes

IGNORE_INDEX = -100
DTYPE = torch.bfloat16
TOLERANCE = 2e-2
LOGIT_STD = 3.0
#: Token rows compared against the float64 reference when there are more than GATE_ALL_ROWS.
GATE_ROWS = 64
GATE_ALL_ROWS = 256
#: Vocab rows of d weight compared when V > GATE_ALL_VOCAB: spread rows + labelled rows.
GATE_VOCAB_SPREAD = 512
GATE_VOCAB_LABELS = 512
GATE_ALL_VOCAB = 2048
#: float64 logits alive at once in the reference's log-sum-exp pass (512 MiB).
REF_CHUNK_ELEMENTS = 1 << 26
#: Token rows whose float64 log-probs `reference_token_logps` computes at once (~256 MiB).
REF_ROW_ELEMENTS = 2**25
#: do_bench budgets (ms): a GPU-shape call takes ~50-150 ms, so the default 200 ms
#: repetition budget would time only 1-2 calls.
BUDGET = Budget(warmup_ms=100, rep_ms=1500)
#: GEMMs of 2 N V D FLOPs any implementation of log-probs (or a token-wise loss of them)
#: must run, per mode: the logits, then d hidden and d weight.
FLOOR_GEMMS = {"fwd": 1, "fwd+bwd": 3}
MODES = ("fwd", "fwd+bwd")


def lm_head(v: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """A seeded bf16 lm_head ``[V, D]`` of std ``LOGIT_STD / sqrt(D)``."""
    weight = torch.randn((v, d), generator=gen, device=gen.device)
    return weight.mul_(LOGIT_STD / d**0.5).to(DTYPE)


def gemm_columns(gemms: Callable[[Case], int], floor_gemms: Callable[[Case], int],
                 tokens: Callable[[Case], int]
                 ) -> Callable[[Case, Any, dict[str, float], float], dict[str, Any]]:
    """A GEMM-bound suite's ``columns``: its case's provider runs ``gemms(case)`` GEMMs of
    2 N V D FLOPs (N = ``tokens(case)``), any implementation ``floor_gemms(case)``."""

    def columns(case: Case, inputs: Any, times: dict[str, float], rate: float
                ) -> dict[str, Any]:
        d, v = case.shape[-2:]
        return timing.gemm_roofline_columns(
            gemms=gemms(case), floor_gemms=floor_gemms(case),
            gemm_flops=2 * tokens(case) * v * d, median_ms=times["median_ms"], rate=rate,
        )

    return columns


# --------------------------------------------------------------------------- reference


@dataclasses.dataclass
class LogProbInputs:
    """Token log-probs from hidden states: ``hidden [N, D]``, ``weight [V, D]``,
    ``labels [N]`` and the upstream gradient ``g_logp [N]`` of the gate."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    g_logp: torch.Tensor

    def args(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A provider's arguments, with `hidden` and `weight` in place of these."""
        return (hidden, weight, self.labels)


def gate_vocab(labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """Rows of d weight compared: all, or GATE_VOCAB_SPREAD spread (first and last
    included) + the labels of the first GATE_VOCAB_LABELS non-ignored tokens."""
    if vocab <= GATE_ALL_VOCAB:
        return torch.arange(vocab, device=labels.device)
    spread = torch.linspace(0, vocab - 1, GATE_VOCAB_SPREAD, device=labels.device).long()
    labelled = labels[labels != IGNORE_INDEX][:GATE_VOCAB_LABELS]
    return torch.unique(torch.cat([spread, labelled]))


def reference_weight_grad(inp: LogProbInputs, vocab: torch.Tensor) -> torch.Tensor:
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


def compute_reference(inp: LogProbInputs) -> Reference:
    """float64 logp and gradients (of ``sum g_logp * logp``) on the gate's subsets."""
    rows = gates.gate_rows(inp.labels, IGNORE_INDEX, spread=GATE_ROWS, all_rows=GATE_ALL_ROWS)
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


def reference_token_logps(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor
                          ) -> torch.Tensor:
    """float64 log-probs of every token ``[B, T]`` (hidden ``[B, T, D]``), a chunk of
    rows at a time."""
    h, flat_ids = hidden.flatten(0, 1), ids.flatten()
    out = torch.empty(flat_ids.shape, dtype=torch.float64, device=ids.device)
    step = max(1, REF_ROW_ELEMENTS // weight.shape[0])
    with torch.no_grad():
        w = weight.double()
        for start in range(0, h.shape[0], step):
            rows = slice(start, start + step)
            out[rows] = reference.linear_logprobs(h[rows].double(), w, flat_ids[rows])
    return out.view(ids.shape)


def loss_reference(loss64: torch.Tensor, token_logp64: torch.Tensor, hidden: torch.Tensor,
                   weight: torch.Tensor, labels: torch.Tensor) -> Reference:
    """d hidden / d weight of the float64 loss `loss64` of the float64 token log-probs
    `token_logp64` (``[B, T]``, a leaf requiring grad) on the gate's subsets: those of
    ``sum g * logp`` with g = d loss / d logp (tokens labelled -100: ignored)."""
    (g_tok,) = torch.autograd.grad(loss64, token_logp64)
    flat = LogProbInputs(hidden.flatten(0, 1), weight, labels.flatten(), g_tok.flatten())
    return compute_reference(flat)


# --------------------------------------------------------------------------- one case


@dataclasses.dataclass
class LossInputs:
    """A loss from hidden states (the linear loss suites): ``hidden [rows, T, D]`` and
    ``weight [V, D]`` (never written), the token ids or `labels`, the loss's other
    arguments `rest` in the order the providers take them, and the gate's float64
    reference: the loss `loss64` and d hidden / d weight on the gate's subsets."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    rest: tuple[torch.Tensor, ...]
    loss64: torch.Tensor
    grads: Reference

    def args(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A provider's arguments, with `hidden` and `weight` in place of these."""
        return (hidden, weight, self.labels, *self.rest)


def loss_suite(op: str, shapes: list[Shape], quick_shapes: list[Shape],
               providers: dict[str, Any], make_inputs: Callable[[Shape, torch.device], Any],
               *, gemms: dict[str, dict[str, int]] | Callable[[str, str], int],
               floor_gemms: dict[str, int], tokens: Callable[[Shape], int],
               **fields: Any) -> Suite:
    """The `Suite` of a loss from hidden states (`LossInputs`) in both `MODES`: gated by
    `gate_loss_from_hidden`, timed by `timed_from_hidden`, against the GEMM rate;
    ``gemms[mode][provider]`` (or ``gemms(mode, provider)``, for a count read from a
    peer's installed release) GEMMs of 2 N V D FLOPs run by a provider,
    ``floor_gemms[mode]`` by any, N = ``tokens(shape)``. `fields`: the suite's other
    `Suite` fields."""
    count = gemms if callable(gemms) else lambda mode, provider: gemms[mode][provider]
    return Suite(
        op, sizes(shapes, DTYPE), sizes(quick_shapes, DTYPE), MODES, providers,
        make_inputs=lambda case, device: make_inputs(case.shape, device),
        gate=gate_loss_from_hidden,
        timed=timed_from_hidden,
        columns=gemm_columns(gemms=lambda case: count(case.mode, case.provider),
                             floor_gemms=lambda case: floor_gemms[case.mode],
                             tokens=lambda case: tokens(case.shape)),
        roofline="gemm",
        budget=lambda case: BUDGET,
        **fields,
    )


def gate_loss_from_hidden(case: Case, inp: Any, fn: Callable[..., torch.Tensor]
                          ) -> tuple[bool, dict[str, float]]:
    """Run the provider once; compare the loss (and d hidden, d weight) with the reference.
    `inp` has ``hidden``, ``weight``, ``args(hidden, weight)``, ``loss64`` and ``grads``
    (a `Reference`)."""
    backward = case.mode != "fwd"
    hidden = inp.hidden.detach().requires_grad_(backward)
    weight = inp.weight.detach().requires_grad_(backward)
    loss = fn(*inp.args(hidden, weight))
    errors: dict[str, float] = {}
    ok, errors["loss"] = gates.check_close(loss, inp.loss64, TOLERANCE)
    if backward:
        d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
        good, more = check_grads(d_hidden.flatten(0, 1), d_weight, inp.grads)
        errors.update(more)
        ok &= good
    return ok, errors


def check_grads(d_hidden: torch.Tensor, d_weight: torch.Tensor, ref: Reference
                ) -> tuple[bool, dict[str, float]]:
    """`gates.check_close` of d hidden ``[N, D]`` and d weight on the reference's rows."""
    errors: dict[str, float] = {}
    ok, errors["grad_hidden"] = gates.check_close(d_hidden[ref.rows], ref.grad_hidden,
                                                  TOLERANCE)
    good, errors["grad_weight"] = gates.check_close(d_weight[ref.vocab], ref.grad_weight,
                                                    TOLERANCE)
    return ok and good, errors


def timed_from_hidden(case: Case, inp: Any, fn: Callable[..., torch.Tensor],
                      grads: torch.Tensor | None = None) -> tuple[Callable[[], Any], None]:
    """The timed call of `case`'s mode (`inp` has ``hidden``, ``weight`` and ``args``):
    ``fn(*args)``, and for fwd+bwd its gradient w.r.t. hidden and weight (upstream
    `grads`); no per-call setup."""
    backward = case.mode != "fwd"
    hidden = inp.hidden.detach().requires_grad_(backward)
    weight = inp.weight.detach().requires_grad_(backward)
    args = inp.args(hidden, weight)
    if not backward:
        return (lambda: fn(*args)), None
    return (lambda: torch.autograd.grad(fn(*args), (hidden, weight), grads)), None
