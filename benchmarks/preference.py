"""What the reference-free preference-loss suites and KTO share (``simpo_loss``,
``cpo_loss``, ``orpo_loss``, ``kto_loss``): each loss measured the way a trainer computes
it, from the policy's final hidden states and lm_head, against Liger-Kernel's chunked
fused-linear version of it, eager PyTorch on materialised logits and its compiled
version.

Inputs, the ``linear_dpo_loss`` suite's: bf16 hidden states ``[rows, T, D]`` and lm_head
``[V, D]`` scaled as `lm_head` says, labels ``[rows, T]`` aligned with the positions
(hidden[:, t] predicts labels[:, t]) with a prompt prefix and the right padding set to
-100 (`objectives.pair_labels`). The paired losses (SimPO, CPO, ORPO) take B pairs,
rows 0..B-1 the chosen answers and B..2B-1 the rejected ones. KTO takes B unpaired
examples with the same layout, half of them desirable (those with the larger log-ratio
to the reference: `kto_inputs`), plus a frozen reference model (the policy's hidden
states plus noise, a copy of its lm_head) and a reference-point KL.

The rlhf_fast provider is the composition a trainer writes: ``rlhf_fast.linear_logprobs``
(no ``[N, V]`` logits), ``rlhf_fast.sequence_logps`` (each answer's sum over its tokens)
and the answer lengths (the mask's row sums), then the op on those ``[B]`` tensors (it
takes per-token means itself where its loss needs them). Its float64 reference is the
same composition through ``rlhf_fast.reference`` (`pair_reference`, `kto_reference`), and
the gate `lm_head`'s (``gate_loss_from_hidden``: the loss, then d hidden and d weight on
its row and vocab subsets, relative error <= 2e-2).

GEMMs of 2 N V D FLOPs (N = rows T), counted per provider in each suite's ``gemms``:
the floor is 1 in fwd (the policy's logits) and 3 in fwd+bwd (then d hidden and d
weight), one more in both for KTO's reference model. rlhf_fast: fwd 1, fwd+bwd 4 (the
loss couples an answer's tokens, so ``linear_logprobs``' backward recomputes the
logits). eager and compile: 1 and 3. Liger: its chunks (one pair, or one example, each)
through ``torch.func.grad_and_value``: 3 in fwd+bwd; in fwd 1 where the installed
release runs the forward alone when nothing requires grad (0.8.5), 3 where it computes
the gradient regardless (`peers.liger_chunked_skips_gradient`).
Every suite's providers: ``rlhf_fast``, ``liger``, ``eager`` (as TRL writes the loss, on
materialised logits) and ``compile``, ``torch.compile`` of ``eager`` (GPU only; skipped
in CPU quick mode), each returning the 0-d loss (`suite`). Modes: ``fwd`` (nothing
requires grad) and ``fwd+bwd`` (``torch.autograd.grad`` of the loss w.r.t. the
(policy's) hidden states and lm_head); no ``bwd`` (Liger computes its gradient in its
forward).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import cases, lm_head, objectives, peers
from rlhf_fast.benchmarks.cases import Case, Suite
from rlhf_fast.benchmarks.lm_head import DTYPE, IGNORE_INDEX

#: (pairs B, T, D, V): 2B T = 8192 tokens through a Llama-3-8B-sized lm_head and 16384
#: through a Qwen2-7B-width one (the linear_dpo_loss suite's shapes).
PAIR_GPU_SHAPES = [(4, 1024, 4096, 128256), (8, 1024, 3584, 151936)]
PAIR_QUICK_SHAPES = [(2, 8, 16, 100), (2, 80, 64, 3000)]
#: (examples B, T, D, V): KTO's, the same tokens.
KTO_GPU_SHAPES = [(8, 1024, 4096, 128256), (16, 1024, 3584, 151936)]
KTO_QUICK_SHAPES = [(4, 8, 16, 100), (4, 80, 64, 3000)]
#: Std of KTO's reference model's hidden states around the policy's: a policy some way
#: from its reference, beta times an answer's log-ratio O(0.1-1) at the quick shapes
#: (more over the GPU shapes' longer answers), so that the loss's value depends on it.
REF_HIDDEN_NOISE = 0.3
#: KTO's reference point, KL(policy || reference) as TRL estimates it from mismatched
#: pairs (detached, clamped at 0: positive here, so Liger, which does not clamp, agrees).
KTO_KL = 0.2
#: The floor of GEMMs of 2 N V D FLOPs (module docstring), without a reference model.
FLOOR_GEMMS = {"fwd": 1, "fwd+bwd": 3}
#: Liger's chunked bases, paired and unpaired (whose forward may skip the gradient).
LIGER_PAIRED_BASE = ("liger_kernel.chunked_loss.fused_linear_preference",
                     "LigerFusedLinearPreferenceBase")
LIGER_UNPAIRED_BASE = ("liger_kernel.chunked_loss.fused_linear_unpaired_preference",
                       "LigerFusedLinearUnpairedPreferenceBase")

#: A paired loss on the ``[B]`` sequence log-prob sums and lengths of the chosen and the
#: rejected answers, through rlhf_fast's op or the reference: ``(pc, pr, lc, lr)`` ->
#: the op's output (its ``.loss``).
PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Any]


def table_shape(shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The table's shape ``2B x T x D x V`` of a paired suite's size (B pairs, T, D, V)."""
    b, t, d, v = shape
    return (2 * b, t, d, v)


def gemms(extra: int, liger_base: tuple[str, str]) -> Callable[[str, str], int]:
    """A suite's ``gemms(mode, provider)`` (module docstring), `extra` GEMMs more for each
    provider's reference model."""
    def count(mode: str, provider: str) -> int:
        if provider == "rlhf_fast":
            return extra + (1 if mode == "fwd" else 4)
        if provider == "liger" and mode == "fwd":
            return extra + (1 if peers.liger_chunked_skips_gradient(*liger_base) else 3)
        return extra + FLOOR_GEMMS[mode]

    return count


def answer_tokens(case: Case, inp: lm_head.LossInputs) -> dict[str, Any]:
    """The rows' ``answer_tokens`` column: the tokens the loss reads."""
    return {"answer_tokens": int((inp.labels != IGNORE_INDEX).sum())}


def suite(op: str, options: dict[str, Any], *, paired: bool,
          eager: Callable[..., torch.Tensor], liger: cases.Provider
          ) -> tuple[Suite, Callable[[Any, torch.device], lm_head.LossInputs]]:
    """A preference suite (`lm_head.loss_suite`) of the op `op` and its
    ``make_inputs(shape, device)``: paired (a reference-free pair loss, `pair_inputs`,
    the table's shape 2B x T x D x V) or KTO's (B examples and a reference model,
    `kto_inputs`). Its providers: ``rlhf_fast`` (the composition ending in
    ``rlhf_fast.<op>``), ``liger`` (`liger`), ``eager`` and ``compile`` (`eager`); its
    float64 reference: ``rlhf_fast.reference.<op>``. Both ops get the suite's
    `options`."""
    inputs, rlhf_fast_loss = ((pair_inputs, rlhf_fast_pair_loss) if paired else
                              (kto_inputs, rlhf_fast_kto_loss))
    make_inputs = functools.partial(inputs, op, with_options(getattr(reference, op), **options))
    providers = {
        "rlhf_fast": rlhf_fast_loss(with_options(getattr(rlhf_fast, op), **options)),
        "liger": liger,
        **cases.eager_and_compiled(eager),
    }
    shapes = (PAIR_GPU_SHAPES, PAIR_QUICK_SHAPES) if paired else (KTO_GPU_SHAPES,
                                                                  KTO_QUICK_SHAPES)
    return lm_head.loss_suite(
        op, *shapes, providers, make_inputs,
        gemms=gemms(0, LIGER_PAIRED_BASE) if paired else gemms(1, LIGER_UNPAIRED_BASE),
        floor_gemms={mode: n + (0 if paired else 1) for mode, n in FLOOR_GEMMS.items()},
        tokens=lambda shape: (2 if paired else 1) * shape[0] * shape[1],
        table_shape=lambda case: table_shape(case.shape) if paired else case.shape,
        describe=answer_tokens,
    ), make_inputs


def pair_suite(op: str, options: dict[str, Any], objective: EagerPairObjective, *,
               per_token_mean: bool, liger: str, **liger_options: Any
               ) -> tuple[Suite, Callable[[Any, torch.device], lm_head.LossInputs]]:
    """A paired `suite`: its ``eager`` provider `objective` on the answers' log-probs
    (`eager_pair_loss`), its ``liger`` one Liger-Kernel's chunked loss `liger` with
    `liger_options` and the suite's `options` (`liger_pair_loss`)."""
    peer = cases.peer(functools.partial(liger_pair_loss, **liger_options, **options),
                      liger_entry(liger), with_device=True)
    return suite(op, options, paired=True, liger=peer,
                 eager=eager_pair_loss(objective, per_token_mean=per_token_mean))

# --------------------------------------------------------------------------- pairs


def rlhf_fast_pair_loss(loss: PairLoss) -> Callable[..., torch.Tensor]:
    """The rlhf_fast provider of a paired loss: ``linear_logprobs`` + ``sequence_logps``
    + the answer lengths + `loss` (rlhf_fast's op with the suite's options)."""

    def run(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
            ) -> torch.Tensor:
        mask = labels != IGNORE_INDEX
        token_logp = rlhf_fast.linear_logprobs(hidden, weight, labels,
                                               ignore_index=IGNORE_INDEX)
        seq = rlhf_fast.sequence_logps(token_logp, mask)
        lengths = mask.sum(-1)
        pairs = labels.shape[0] // 2
        return loss(seq[:pairs], seq[pairs:], lengths[:pairs], lengths[pairs:]).loss

    return run


#: A paired loss as a trainer writes it, on the chosen and the rejected answers' log-probs
#: (sums, or per-token means: `eager_pair_loss`) and the chosen rows' logits and labels
#: (for an NLL term): ``(chosen, rejected, chosen_logits, chosen_labels)`` -> the 0-d loss.
EagerPairObjective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                              torch.Tensor]


def eager_pair_loss(objective: EagerPairObjective, *, per_token_mean: bool
                    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The ``eager`` provider of a paired loss, from what a trainer's eager code starts
    from: the bf16 logits ``hidden @ weight.T``, each row's answer log-prob sum (fp32
    log_softmax, gather, masked sum), with `per_token_mean` divided by its answer length;
    then `objective` on the pairs."""

    def eager(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
              ) -> torch.Tensor:
        logits = hidden @ weight.T
        logps = objectives.eager_sequence_logps(logits, labels)
        if per_token_mean:
            logps = logps / (labels != IGNORE_INDEX).sum(-1)
        pairs = labels.shape[0] // 2
        return objective(logps[:pairs], logps[pairs:], logits[:pairs], labels[:pairs])

    return eager


def eager_chosen_nll(chosen_logits: torch.Tensor, chosen_labels: torch.Tensor
                     ) -> torch.Tensor:
    """The chosen answers' NLL per answer token as TRL writes it: ``F.cross_entropy`` of
    their logits (fp32) against their labels, a second pass over those logits."""
    return F.cross_entropy(chosen_logits.float().flatten(0, 1), chosen_labels.flatten(),
                           ignore_index=IGNORE_INDEX)


def liger_pair_loss(loss_cls: Any, device: torch.device, **options: Any
                    ) -> Callable[..., torch.Tensor]:
    """A Liger-Kernel chunked paired loss ``loss_cls(**options)`` (compiled on CUDA, as
    the linear_dpo_loss suite runs Liger's DPO), called as its modules are, ``(lm_head
    weight, hidden, labels)``: its loss, the first of its outputs."""
    loss_fn = loss_cls(ignore_index=IGNORE_INDEX, compiled=device.type == "cuda", **options)

    def run(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
            ) -> torch.Tensor:
        return peers.first_output(loss_fn(weight, hidden, labels))

    return run


def liger_entry(name: str) -> peers.Entry:
    """A Liger-Kernel chunked loss: PyTorch code, so it runs on any device."""
    return peers.Entry("liger", "liger_kernel.chunked_loss", name, runs=peers.Runs.ANY_DEVICE)


#: (loss64, grads) per (op, shape, device): the inputs are seeded, every provider shares it.
_references: dict[tuple[str, tuple[int, ...], str], tuple[torch.Tensor, lm_head.Reference]] = {}


def pair_inputs(op: str, loss: PairLoss, shape: tuple[int, int, int, int],
                device: torch.device) -> lm_head.LossInputs:
    """Seeded pair inputs (module docstring) and their float64 reference through `loss`
    (the reference op with the suite's options), once per shape."""
    pairs, t, d, v = shape
    gen = torch.Generator(device=device).manual_seed(1234)
    hidden = torch.randn((2 * pairs, t, d), generator=gen, device=device).to(DTYPE)
    weight = lm_head.lm_head(v, d, gen)
    labels = objectives.pair_labels(pairs, t, v, gen)
    key = (op, shape, str(device))
    if key not in _references:
        _references[key] = pair_reference(loss, hidden, weight, labels)
    loss64, grads = _references[key]
    return lm_head.LossInputs(hidden, weight, labels, (), loss64, grads)


def pair_reference(loss: PairLoss, hidden: torch.Tensor, weight: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, lm_head.Reference]:
    """The float64 loss of the float64 answer log-prob sums and lengths, and its d
    hidden / d weight on the gate's subsets (`lm_head.loss_reference`)."""
    mask = labels != IGNORE_INDEX
    tok64 = lm_head.reference_token_logps(hidden, weight, labels).requires_grad_(True)
    seq64 = reference.sequence_logps(tok64, mask)
    lengths = mask.sum(-1)
    pairs = labels.shape[0] // 2
    loss64 = loss(seq64[:pairs], seq64[pairs:], lengths[:pairs], lengths[pairs:]).loss
    grads = lm_head.loss_reference(loss64, tok64, hidden, weight, labels)
    return loss64.detach(), grads


# --------------------------------------------------------------------------- KTO


#: KTO's (loss64, grads, desirable) per (op, shape, device).
_kto_references: dict[tuple[str, tuple[int, ...], str],
                      tuple[torch.Tensor, lm_head.Reference, torch.Tensor]] = {}


def kto_inputs(op: str, kto_loss: Callable[..., Any], shape: tuple[int, int, int, int],
               device: torch.device) -> lm_head.LossInputs:
    """Seeded KTO inputs (module docstring): ``rest`` = (reference hidden states, its
    lm_head, desirable ``[B]`` bool, the reference-point KL, 0-d fp32), and their float64
    reference through `kto_loss` (the reference op with the suite's options).

    The desirable examples are the half with the larger float64 log-ratio of the
    policy's answer log-prob sum over the reference's: a policy that has learnt its
    labels, so that both groups' losses are below 1/2 and the loss's value tells a
    provider's log-ratios apart (sums from per-token means, say). With labels drawn
    independently of the log-ratios, the mean loss would sit at ~1/2 whatever they are,
    and only the gradient would check them."""
    b, t, d, v = shape
    gen = torch.Generator(device=device).manual_seed(1234)
    hidden = torch.randn((b, t, d), generator=gen, device=device)
    ref_hidden = hidden + REF_HIDDEN_NOISE * torch.randn((b, t, d), generator=gen,
                                                         device=device)
    hidden, ref_hidden = hidden.to(DTYPE), ref_hidden.to(DTYPE)
    weight = lm_head.lm_head(v, d, gen)
    ref_weight = weight.clone()  # a frozen copy of the policy's lm_head
    labels = objectives.pair_labels(b // 2, t, v, gen)
    kl = torch.tensor(KTO_KL, device=device)
    key = (op, shape, str(device))
    if key not in _kto_references:
        _kto_references[key] = kto_reference(kto_loss, hidden, weight, labels, ref_hidden,
                                             ref_weight, kl)
    loss64, grads, desirable = _kto_references[key]
    return lm_head.LossInputs(hidden, weight, labels, (ref_hidden, ref_weight, desirable, kl),
                              loss64, grads)


def kto_reference(kto_loss: Callable[..., Any], hidden: torch.Tensor, weight: torch.Tensor,
                  labels: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
                  kl: torch.Tensor
                  ) -> tuple[torch.Tensor, lm_head.Reference, torch.Tensor]:
    """The desirable flags (`kto_inputs`), the float64 KTO loss of both models' float64
    answer log-prob sums, and its d hidden / d weight on the gate's subsets."""
    mask = labels != IGNORE_INDEX
    tok64 = lm_head.reference_token_logps(hidden, weight, labels).requires_grad_(True)
    ref_tok64 = lm_head.reference_token_logps(ref_hidden, ref_weight, labels)
    seq64 = reference.sequence_logps(tok64, mask)
    ref_seq64 = reference.sequence_logps(ref_tok64, mask)
    log_ratio = (seq64 - ref_seq64).detach()
    desirable = log_ratio > log_ratio.median()  # the lower median: B / 2 of them
    loss64 = kto_loss(seq64, ref_seq64, desirable, kl.double()).loss
    grads = lm_head.loss_reference(loss64, tok64, hidden, weight, labels)
    return loss64.detach(), grads, desirable


def rlhf_fast_kto_loss(kto_loss: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    """The rlhf_fast provider of KTO: the reference model's answer sums under no_grad,
    then the policy's (``linear_logprobs`` + ``sequence_logps``), then `kto_loss`
    (rlhf_fast's op with the suite's options)."""

    def run(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
            ref_hidden: torch.Tensor, ref_weight: torch.Tensor, desirable: torch.Tensor,
            kl: torch.Tensor) -> torch.Tensor:
        mask = labels != IGNORE_INDEX
        with torch.no_grad():
            ref_seq = rlhf_fast.sequence_logps(
                rlhf_fast.linear_logprobs(ref_hidden, ref_weight, labels,
                                          ignore_index=IGNORE_INDEX), mask)
        seq = rlhf_fast.sequence_logps(
            rlhf_fast.linear_logprobs(hidden, weight, labels, ignore_index=IGNORE_INDEX),
            mask)
        return kto_loss(seq, ref_seq, desirable, kl).loss

    return run


def with_options(op: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """`op` (rlhf_fast's or the reference's) with a suite's options bound."""
    return functools.partial(op, **options)
