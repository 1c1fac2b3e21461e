"""`rlhf_fast.pair_logps`: the sequence log-probs of a stacked preference batch, with
LD-DPO's down-weighted tail and WPO's pair weights (the DPO options that need tokens)."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    MASK_DTYPES,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.sequence_logps import sequence_logps
from rlhf_fast.options import PAIR_LOGPS_OPTIONS, dpo_terms
from rlhf_fast.types import DPO_LENGTH_NORMALISED_TYPES, DPO_SFT, PairLogps


@PAIR_LOGPS_OPTIONS.keywords
def pair_logps(token_logp: torch.Tensor, mask: torch.Tensor, *,
               log_sum_p2: torch.Tensor | None = None, **options: Any) -> PairLogps:
    """Each answer's log-prob in a stacked pair batch, what `dpo_loss` takes.

    ``sequence_logps`` of the chosen and the rejected rows, and what the DPO variants
    that need the tokens read: LD-DPO's sums (ld_alpha: the tokens past the pair's shorter
    answer count ld_alpha times), the chosen answers' plain sums for the sft term, and
    WPO's pair weights from log sum_j p_j^2 (`logprobs(..., return_sum_p2=True)`). The
    formulas and TRL's forms: `rlhf_fast.reference.pair_logps`.

    Example (LD-DPO with WPO and an sft term, from the logits)::

        logp, log_sum_p2 = logprobs(logits, labels, return_sum_p2=True)
        pol = pair_logps(logp, mask, ld_alpha=0.5, log_sum_p2=log_sum_p2)
        ref = pair_logps(ref_logp, mask, ld_alpha=0.5)
        dpo_loss(pol.chosen, pol.rejected, ref.chosen, ref.rejected, weights=pol.weights,
                 chosen_lengths=pol.chosen_lengths, sft_logps=pol.sft_logps,
                 rpo_alpha=1.0)

    Args:
        token_logp: ``[2B, T]`` per-token log-probs, rows 0..B-1 the chosen answers and
            B..2B-1 the rejected ones (pair b: rows b and B + b); fp32, bf16, fp16 or
            fp64; differentiable.
        mask: ``[2B, T]`` bool or numeric, nonzero = an answer token (a mask, not a
            weight). Masked entries are never read.
        log_sum_p2: ``[2B, T]`` float, log sum_j p_j^2 of each position's distribution,
            for WPO's weights; None: no weights. Not differentiated.
        Options: below.

    Returns:
        `PairLogps`: chosen, rejected, chosen_lengths, rejected_lengths ``[B]``,
        sft_logps ``[B]`` (with ld_alpha, else None), weights ``[B]`` (with log_sum_p2,
        else None); fp32 (fp64 for fp64 token_logp). Gradients in token_logp's dtype.
    """
    check_tensor("token_logp", token_logp, FLOAT_DTYPES)
    if token_logp.dim() != 2 or token_logp.shape[0] % 2 or token_logp.shape[0] == 0:
        raise ValueError("token_logp must have shape [2B, T] with B >= 1 (chosen rows first), "
                         f"got {tuple(token_logp.shape)}")
    check_tensor("mask", mask, MASK_DTYPES)
    check_same_device("mask", mask, "token_logp", token_logp)
    check_same_shape("mask", mask, "token_logp", token_logp)
    if log_sum_p2 is not None:
        check_tensor("log_sum_p2", log_sum_p2, FLOAT_DTYPES)
        check_same_device("log_sum_p2", log_sum_p2, "token_logp", token_logp)
        check_same_shape("log_sum_p2", log_sum_p2, "token_logp", token_logp)
    opt = PAIR_LOGPS_OPTIONS.check(options)
    if not use_triton(token_logp):
        return reference.pair_logps(token_logp, mask, log_sum_p2=log_sum_p2, **vars(opt))

    pairs = token_logp.shape[0] // 2
    valid = mask != 0
    counts = valid.sum(-1)
    sums, sft_logps = sequence_logps(token_logp, mask), None
    if opt.ld_alpha is not None:
        shared = torch.minimum(counts[:pairs], counts[pairs:]).repeat(2)
        tail = valid.cumsum(-1) > shared[:, None]
        # in the sums' precision: the gradients of both sums then meet in fp32 and are
        # rounded to a bf16 input's dtype once
        wide = token_logp.to(sums.dtype)
        sums = sequence_logps(torch.where(tail, wide * opt.ld_alpha, wide), mask)
        sft_logps = sequence_logps(wide[:pairs], mask[:pairs])
    weights = None
    if log_sum_p2 is not None:
        with torch.no_grad():
            aligned = token_logp.to(sums.dtype) - log_sum_p2.to(sums.dtype)
            mean = sequence_logps(aligned, mask, average=True)
            weights = (mean[:pairs] + mean[pairs:]).exp()
    lengths = counts.to(sums.dtype)
    return PairLogps(sums[:pairs], sums[pairs:], lengths[:pairs], lengths[pairs:], sft_logps,
                     weights)


def dpo_inputs(pair: PairLogps, options: Any) -> dict[str, torch.Tensor | None]:
    """The keyword tensors of `dpo_loss` from a `pair_logps` result, each where `options`
    (an object with the DPO options loss_type, loss_weights and rpo_alpha) read it."""
    kinds = {kind for kind, _ in dpo_terms(options)}
    normalised = bool(kinds & set(DPO_LENGTH_NORMALISED_TYPES))
    return dict(chosen_lengths=pair.chosen_lengths if normalised or DPO_SFT in kinds else None,
                rejected_lengths=pair.rejected_lengths if normalised else None,
                weights=pair.weights,
                sft_logps=pair.sft_logps if DPO_SFT in kinds else None)
