"""Benchmark of `rlhf_fast.linear_dpo_loss`: the DPO loss straight from hidden states.

The objective of the ``dpo_loss`` suite (`objectives`: sigmoid DPO, beta 0.1, mean over B
pairs) with a reference model, from hidden states instead of logits: the policy's last hidden states
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
  forward: 4 GEMMs in fwd+bwd; in fwd 2 where the installed release runs the forward
  alone when nothing requires grad (0.8.5), 4 where it computes the gradient regardless
  (earlier releases; `peers.liger_chunked_skips_gradient`). Pure PyTorch, so it runs on
  the CPU too; skipped, with the reason, where not installed.
* ``eager``: materialised logits of both models (the reference's under no_grad), fp32
  ``log_softmax``, ``gather``, masked sums, ``-logsigmoid(beta * margin).mean()``: 2 / 4.
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Modes: ``fwd`` (nothing requires grad) and ``fwd+bwd`` (``torch.autograd.grad`` of the
loss w.r.t. the policy's hidden states and lm_head).

No ``bwd`` mode: the fused providers split the work between forward and backward
differently (Liger and the fused losses compute gradients in the forward), so a
backward-alone time would compare different work; ``fwd+bwd`` is the comparable number.

Correctness gate, `lm_head`'s (that of the ``linear_logprobs`` suite): float64 sequence
log-probs of both models (``reference.linear_logprobs`` a chunk of rows at a time) give
the float64 loss (``reference.dpo_loss``) and its gradient w.r.t. each policy sequence
log-prob, hence w.r.t. each answer token's log-prob; d hidden and d weight are those of
``sum g * logp``, compared on the linear_logprobs suite's row and vocab subsets.
Relative error <= 2e-2. A provider that does not match is reported "wrong", not timed.

Roofline: ``floor_flops`` = (fwd 2, fwd+bwd 4) GEMMs of 2 N V D FLOPs (N = 2B T) over the
measured bf16 GEMM rate, as in the ``linear_logprobs`` suite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import cases, lm_head, objectives, peers
from rlhf_fast.benchmarks.cases import Case
from rlhf_fast.benchmarks.lm_head import DTYPE, IGNORE_INDEX

OP = "linear_dpo_loss"
BETA = objectives.DPO_BETA
#: (pairs B, T, D, V): 2B T = 8192 tokens through a Llama-3-8B-sized lm_head and 16384
#: through a Qwen2-7B-width one (the linear_logprobs suite's shapes).
GPU_SHAPES = [(4, 1024, 4096, 128256), (8, 1024, 3584, 151936)]
QUICK_SHAPES = [(2, 8, 16, 100), (2, 80, 64, 3000)]
MODES = lm_head.MODES
#: GEMMs of 2 N V D FLOPs each provider runs (policy + reference), and the floor.
GEMMS = {"fwd": {"rlhf_fast": 2, "liger": 4, "eager": 2, "compile": 2},
         "fwd+bwd": {"rlhf_fast": 5, "liger": 4, "eager": 4, "compile": 4}}
FLOOR_GEMMS = {"fwd": 2, "fwd+bwd": 4}
#: Liger's chunked preference base, whose forward may skip the gradient without grad.
LIGER_BASE = ("liger_kernel.chunked_loss.fused_linear_preference",
              "LigerFusedLinearPreferenceBase")


def provider_gemms(mode: str, provider: str) -> int:
    """GEMMs of 2 N V D FLOPs `provider` runs in `mode` (GEMMS; Liger's fwd: 2 where its
    installed release skips the gradient when nothing requires grad)."""
    if provider == "liger" and mode == "fwd" and peers.liger_chunked_skips_gradient(
            *LIGER_BASE):
        return 2
    return GEMMS[mode][provider]
#: Std of the reference's hidden states around the policy's (beta * margin is O(1)).
REF_HIDDEN_NOISE = 0.05


def table_shape(shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The table's shape ``2B x T x D x V`` of the size (B pairs, T, D, V)."""
    b, t, d, v = shape
    return (2 * b, t, d, v)


# --------------------------------------------------------------------------- providers

#: Every provider's signature: (hidden, weight, labels, ref_hidden, ref_weight) -> loss.
LossFn = Callable[..., torch.Tensor]


def rlhf_fast_linear_dpo_loss(
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


def eager_linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          ref_hidden: torch.Tensor, ref_weight: torch.Tensor) -> torch.Tensor:
    """Both models' logits materialised, then the dpo_loss suite's eager loss."""
    with torch.no_grad():
        ref_seq = objectives.eager_sequence_logps(ref_hidden @ ref_weight.T, labels)
    seq = objectives.eager_sequence_logps(hidden @ weight.T, labels)
    pairs = labels.shape[0] // 2
    return objectives.eager_dpo_objective(seq, ref_seq[:pairs], ref_seq[pairs:])


LIGER = peers.Entry("liger", "liger_kernel.chunked_loss", "LigerFusedLinearDPOLoss",
                    runs=peers.Runs.ANY_DEVICE)


def liger_linear_dpo_loss(loss_cls: Any, device: torch.device) -> LossFn:
    """Liger-Kernel's chunked fused linear DPO loss, the reference model computed inside."""
    loss_fn = loss_cls(beta=BETA, ignore_index=IGNORE_INDEX, compiled=device.type == "cuda")

    def run(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
            ref_hidden: torch.Tensor, ref_weight: torch.Tensor) -> torch.Tensor:
        out = loss_fn(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)
        return peers.first_output(out)

    return run


PROVIDERS = {
    "rlhf_fast": rlhf_fast_linear_dpo_loss,
    "liger": cases.peer(liger_linear_dpo_loss, LIGER, with_device=True),
    **cases.eager_and_compiled(eager_linear_dpo_loss),
}


# --------------------------------------------------------------------------- inputs


#: (loss64, grads) per (shape, device): the inputs are seeded, every provider shares it.
_references: dict[tuple[tuple[int, ...], str], tuple[torch.Tensor, Any]] = {}


def make_inputs(shape: tuple[int, int, int, int], device: torch.device
                ) -> lm_head.LossInputs:
    """Seeded inputs (hidden / weight scaled as `lm_head` says; the dpo_loss suite's
    prompt and padding layout) and their float64 reference, once per shape."""
    pairs, t, d, v = shape
    rows = 2 * pairs
    gen = torch.Generator(device=device).manual_seed(1234)
    hidden = torch.randn((rows, t, d), generator=gen, device=device)
    ref_hidden = hidden + REF_HIDDEN_NOISE * torch.randn(
        (rows, t, d), generator=gen, device=device
    )
    hidden, ref_hidden = hidden.to(DTYPE), ref_hidden.to(DTYPE)
    weight = lm_head.lm_head(v, d, gen)
    ref_weight = weight.clone()  # a frozen copy of the policy's lm_head

    labels = objectives.pair_labels(pairs, t, v, gen)

    key = (shape, str(device))
    if key not in _references:
        _references[key] = _reference(hidden, weight, labels, ref_hidden, ref_weight)
    loss64, grads = _references[key]
    return lm_head.LossInputs(hidden, weight, labels, (ref_hidden, ref_weight), loss64, grads)


def _reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
) -> tuple[torch.Tensor, lm_head.Reference]:
    """The float64 loss, and d hidden / d weight on the gate's subsets: d loss / d logp of
    an answer token is its sequence's (prompt and padding: ignored)."""
    mask = labels != IGNORE_INDEX
    tok64 = lm_head.reference_token_logps(hidden, weight, labels).requires_grad_(True)
    ref_tok64 = lm_head.reference_token_logps(ref_hidden, ref_weight, labels)
    seq64 = reference.sequence_logps(tok64, mask)
    ref_seq64 = reference.sequence_logps(ref_tok64, mask)
    pairs = labels.shape[0] // 2
    loss64 = objectives.dpo_objective(reference.dpo_loss, seq64, ref_seq64[:pairs],
                                      ref_seq64[pairs:])
    grads = lm_head.loss_reference(loss64, tok64, hidden, weight, labels)
    return loss64.detach(), grads


# --------------------------------------------------------------------------- one case


SUITE = lm_head.loss_suite(
    OP, GPU_SHAPES, QUICK_SHAPES, PROVIDERS, make_inputs, gemms=provider_gemms,
    floor_gemms=FLOOR_GEMMS, tokens=lambda shape: 2 * shape[0] * shape[1],
    table_shape=lambda case: table_shape(case.shape),
    describe=lambda case, inp: {"answer_tokens": int((inp.labels != IGNORE_INDEX).sum())},
)


def test_linear_dpo_loss(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
