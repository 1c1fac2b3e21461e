"""`rlhf_fast.linear_logprobs` and the fused losses on hidden states: no [N, V] logits.

`linear_logprobs` equals ``logprobs(hidden @ weight.T + bias, labels, ...)`` without the
logits ever existing whole (design and costs: `rlhf_fast.kernels.linear_logprobs`).
`linear_dpo_loss` composes it with `sequence_logps` and `dpo_loss`; `linear_ppo_loss`
computes the gradient during the forward (the PPO loss is token-wise), skipping the
backward's recompute GEMM.
"""

from __future__ import annotations

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import linear_logprobs as kernel
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_int,
    check_positive,
    check_same_device,
    check_tensor,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.dpo import dpo_loss
from rlhf_fast.ops.logprobs import check_label_range
from rlhf_fast.ops.sequence_logps import sequence_logps
from rlhf_fast.reference import DPO_LENGTH_NORMALISED_TYPES, DPOLossOutput


class LinearLogProbsFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked kernels. Inputs validated by `linear_logprobs`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy):
        logp, entropy, row_stats = kernel.linear_logprobs_forward(
            hidden, weight, bias, labels, temperature, ignore_index, return_entropy
        )
        ctx.save_for_backward(hidden, weight, bias, labels, row_stats, entropy)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.set_materialize_grads(False)
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, g_logp, g_entropy=None):
        hidden, weight, bias, labels, row_stats, entropy = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if (g_logp is None and g_entropy is None) or not any(needs):
            return None, None, None, None, None, None, None
        d_hidden, d_weight, d_bias = kernel.linear_logprobs_backward(
            hidden, weight, bias, labels, row_stats, entropy,
            None if g_logp is None else g_logp.contiguous(),
            None if g_entropy is None else g_entropy.contiguous(),
            ctx.temperature, ctx.ignore_index, needs,
        )
        return d_hidden, d_weight, d_bias, None, None, None, None


def _check_linear_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    check_tensor("hidden", hidden, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("labels", labels, INDEX_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must have shape [..., D] with D >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, D] with V >= 1 and D = hidden.shape[-1] = "
            f"{hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    check_same_device("weight", weight, "hidden", hidden)
    check_same_device("labels", labels, "hidden", hidden)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), "
            f"got {tuple(labels.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        check_same_device("bias", bias, "hidden", hidden)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}"
            )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    check_labels: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label (and entropy) under softmax((hidden @ weight.T + bias) / T).

    Equal to ``logprobs(hidden @ weight.T + bias, labels, ...)`` (the logits rounded to
    the input dtype, as a model's lm_head makes them), without ever storing the
    ``[N, V]`` logits: at most `kernels.linear_logprobs.CHUNK_ELEMENTS` logits (256 MB
    in bf16) exist at once, whatever N, plus an fp32 ``[N, D]`` accumulator in the
    backward.

    Args:
        hidden: ``[..., D]`` final hidden states, bf16, fp16, fp32 (or fp64).
        weight: ``[V, D]`` the lm_head weight, hidden's dtype. With requires_grad False
            (frozen, e.g. LoRA) its gradient GEMM is skipped.
        labels: ``[...]`` (hidden.shape[:-1]) int64 / int32 token ids in [0, V), or
            ignore_index (log-prob 0, entropy 0, no gradient).
        bias: optional ``[V]`` bias, hidden's dtype.
        temperature: z = logits / temperature, > 0.
        return_entropy: also return each row's entropy; gradients from both outputs.
        check_labels: as in `rlhf_fast.logprobs` (default on for CPU, off for CUDA).

    Returns:
        ``logp [...]`` (and ``entropy [...]``), fp32 (fp64 for fp64 inputs). Gradients:
        d hidden, d weight (one GEMM per vocab chunk over all tokens, fp32 accumulation,
        rounded once to weight's dtype) and d bias, each in its input's dtype.

    Not batch-invariant: cuBLAS chooses its GEMM algorithm from the shapes, so a token's
    outputs can differ in the last bits with N (use `rlhf_fast.logprobs` on materialised
    logits where bit-identical rollout / training log-probs matter).
    """
    _check_linear_inputs(hidden, weight, labels, bias)
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    if check_labels is None:
        check_labels = not hidden.is_cuda
    if check_labels:
        check_label_range(labels, weight.shape[0], ignore_index)
    if not use_triton(hidden):
        return reference.linear_logprobs(
            hidden, weight, labels, bias=bias, temperature=temperature,
            ignore_index=ignore_index, return_entropy=return_entropy,
        )
    shape = labels.shape
    outputs = LinearLogProbsFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), labels.reshape(-1).contiguous(),
        temperature, ignore_index, bool(return_entropy),
    )
    if return_entropy:
        return outputs[0].view(shape), outputs[1].view(shape)
    return outputs.view(shape)


def linear_dpo_loss(
    hidden_chosen_and_rejected: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> DPOLossOutput:
    """The DPO loss family straight from the hidden states of a stacked pair batch.

    ``linear_logprobs`` + ``sequence_logps`` + ``dpo_loss``: no logits tensor. The DPO
    loss couples every token of a pair, so the gradient needs the whole forward first;
    this is the composition (4 GEMMs per chunk), not a single fused pass.

    Args:
        hidden_chosen_and_rejected: ``[2B, T, D]``: rows 0..B-1 the chosen answers,
            rows B..2B-1 the rejected ones (hidden[:, t] predicts labels[:, t]).
        weight, bias, temperature, ignore_index: as in `linear_logprobs`.
        labels: ``[2B, T]`` the tokens whose log-probs are summed.
        mask: ``[2B, T]`` bool or 0/1: the answer tokens (prompt and padding 0).
        ref_chosen, ref_rejected: ``[B]`` reference sequence log-probs, or both None.
        beta, loss_type, label_smoothing, reduction: as in `dpo_loss`; for ipo and
            sigmoid_norm the answer lengths are the mask's row sums.

    Returns:
        `DPOLossOutput`, exactly `dpo_loss` of the sequence log-probs.
    """
    hidden = hidden_chosen_and_rejected
    if hidden.dim() != 3 or hidden.shape[0] % 2 != 0:
        raise ValueError(
            "hidden_chosen_and_rejected must have shape [2B, T, D] (chosen rows first), "
            f"got {tuple(hidden.shape)}"
        )
    token_logp = linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index
    )
    seq_logp = sequence_logps(token_logp, mask)
    n_pairs = hidden.shape[0] // 2
    lengths = {}
    if loss_type in DPO_LENGTH_NORMALISED_TYPES:
        counts = (mask != 0).sum(-1)
        lengths = dict(chosen_lengths=counts[:n_pairs], rejected_lengths=counts[n_pairs:])
    return dpo_loss(
        seq_logp[:n_pairs], seq_logp[n_pairs:], ref_chosen, ref_rejected, beta=beta,
        loss_type=loss_type, label_smoothing=label_smoothing, reduction=reduction, **lengths,
    )
