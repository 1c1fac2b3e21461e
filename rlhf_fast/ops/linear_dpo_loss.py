"""`rlhf_fast.linear_dpo_loss`: the DPO loss family from the hidden states of a pair batch.

The composition ``linear_logprobs`` + ``pair_logps`` + ``dpo_loss``, with no [N, V]
logits tensor: the DPO loss couples every token of a pair, so the gradient needs the
whole forward first (4 GEMMs per chunk, not one fused pass).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    MASK_DTYPES,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from rlhf_fast.ops.dpo_loss import dpo_loss
from rlhf_fast.ops.linear_logprobs import check_linear_inputs, ignore_masked_labels, token_logprobs
from rlhf_fast.ops.logprobs import check_label_range, check_logprob_options
from rlhf_fast.ops.pair_logps import dpo_inputs, pair_logps
from rlhf_fast.options import DPO_OPTIONS, DPO_TOKEN_OPTIONS, LOGPROB_OPTIONS
from rlhf_fast.types import DPOLossOutput


def check_pair_shapes(hidden: torch.Tensor, labels: torch.Tensor,
                      ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None
                      ) -> None:
    """linear_dpo_loss's shapes, named as its caller wrote them (the ops it composes
    would name their own arguments)."""
    check_tensor("labels", labels, INDEX_DTYPES)
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"labels must have shape [2B, T] = {tuple(hidden.shape[:2])} "
            f"(hidden_chosen_and_rejected.shape[:2]), got {tuple(labels.shape)}"
        )
    n_pairs = hidden.shape[0] // 2
    for name, ref in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        if torch.is_tensor(ref) and tuple(ref.shape) != (n_pairs,):
            raise ValueError(
                f"{name} must have shape [B] = ({n_pairs},) (one per pair), "
                f"got {tuple(ref.shape)}"
            )


@(LOGPROB_OPTIONS + DPO_OPTIONS + DPO_TOKEN_OPTIONS).keywords
def linear_dpo_loss(
    hidden_chosen_and_rejected: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    mask: torch.Tensor, ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None, *,
    bias: torch.Tensor | None = None, **options: Any,
) -> DPOLossOutput:
    """The DPO loss family straight from the hidden states of a stacked pair batch.

    ``linear_logprobs`` + ``pair_logps`` + ``dpo_loss``: no logits tensor. The DPO
    loss couples every token of a pair, so the gradient needs the whole forward first;
    this is the composition (4 GEMMs per chunk), not a single fused pass.

    Args:
        hidden_chosen_and_rejected: ``[2B, T, D]``: rows 0..B-1 the chosen answers,
            rows B..2B-1 the rejected ones (hidden[:, t] predicts labels[:, t]).
        weight, bias: as in `linear_logprobs`.
        labels: ``[2B, T]`` the tokens whose log-probs are summed, in [0, V) or
            ignore_index at the answer tokens; outside the mask they are not read.
        mask: ``[2B, T]`` bool or numeric, nonzero = an answer token (prompt and
            padding 0); a mask, not a weight.
        ref_chosen, ref_rejected: ``[B]`` reference sequence log-probs, or both None.
        Options: below, those of `linear_logprobs`, of `dpo_loss` and the two that read
            tokens (ld_alpha, use_weighting, through `pair_logps`); the answer lengths
            (ipo, sigmoid_norm, sft) are the mask's row sums. The reference log-probs are
            the caller's: with ld_alpha, LD-DPO's sums of the reference too (TRL's).

    Returns:
        `DPOLossOutput`, exactly `dpo_loss` of `pair_logps` of the token log-probs.
    """
    hidden = hidden_chosen_and_rejected
    name = "hidden_chosen_and_rejected"
    check_tensor(name, hidden, FLOAT_DTYPES)
    if hidden.dim() != 3 or hidden.shape[0] % 2 != 0 or hidden.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape [2B, T, D] with B >= 1 (chosen rows first), got "
            f"{tuple(hidden.shape)}"
        )
    check_pair_shapes(hidden, labels, ref_chosen, ref_rejected)
    compute_dtype = check_linear_inputs(hidden, weight, labels, bias, name)
    # Tokens outside the mask are ignored outright: no NaN hidden state there can reach a
    # gradient through 0 * NaN.
    check_tensor("mask", mask, MASK_DTYPES)
    check_same_device("mask", mask, name, hidden)
    check_same_shape("mask", mask, "labels", labels)
    opt = check_logprob_options(LOGPROB_OPTIONS.pick(options), hidden)
    token_options = DPO_TOKEN_OPTIONS.check(DPO_TOKEN_OPTIONS.pick(options))
    dpo_options = DPO_OPTIONS.check({k: v for k, v in options.items() if k not in
                                     LOGPROB_OPTIONS.names + DPO_TOKEN_OPTIONS.names})
    labels = ignore_masked_labels(labels, mask, opt.ignore_index)
    if opt.check_labels:
        check_label_range(labels, weight.shape[0], opt.ignore_index)
    weighting = token_options.use_weighting
    token_logp = token_logprobs(hidden, weight, labels, bias, opt, False, weighting,
                                compute_dtype)
    log_sum_p2 = None
    if weighting:
        token_logp, log_sum_p2 = token_logp
    pair = pair_logps(token_logp, mask, log_sum_p2=log_sum_p2, ld_alpha=token_options.ld_alpha)
    return dpo_loss(pair.chosen, pair.rejected, ref_chosen, ref_rejected,
                    **dpo_inputs(pair, dpo_options), **vars(dpo_options))

