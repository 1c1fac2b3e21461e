"""Token log-probs from logits or hidden states, and their per-sequence sums."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rlhf_fast.options import PAIR_LOGPS_OPTIONS, TOKEN_OPTIONS
from rlhf_fast.reference.common import compute_dtype, nan_where
from rlhf_fast.types import PairLogps


@TOKEN_OPTIONS.keywords
def logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, return_entropy: bool = False,
    return_sum_p2: bool = False, **options: Any
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Log-probability of each label under softmax(logits / temperature), its entropy
    and log sum_j p_j^2.

    Args:
        logits: ``[..., V]`` float tensor.
        labels: ``[...]`` integer tensor of token ids in ``[0, V)`` or ``ignore_index``.
        return_entropy: also return H = -sum_j p_j log p_j.
        return_sum_p2: also return log sum_j p_j^2 (the collision log-probability; verl's
            ``sum_pi_squared`` is its exp).
        Options: below; z = logits / temperature.

    Returns:
        ``logp [...]``, or a tuple of it, ``entropy [...]`` (with return_entropy) and
        ``log_sum_p2 [...]`` (with return_sum_p2), in fp32 (fp64 for fp64 logits).

    Semantics the kernels share:
      * logp = z[label] - logsumexp(z); H = logsumexp(z) - sum_j p_j z_j;
        log_sum_p2 = logsumexp_j(2 log p_j).
      * A logit of -inf is a token of probability 0: it adds nothing to the entropy.
      * A row whose label is ``ignore_index`` gives 0 for every output, and no gradient
        flows into its logits from any.
      * A row whose label is outside [0, V) (and not ignore_index) gives NaN for all, and
        a NaN gradient for every logit of the row.
      * Labels and ignore_index are compared as integers: an ignore_index outside the
        labels' dtype (int32 labels, ignore_index = 5 + 2**32) matches no label.
      * NaN or +inf anywhere in a row gives NaN for that row only.
    """
    vocab = logits.shape[-1]
    opt = TOKEN_OPTIONS.fill(options)
    temperature, ignore_index = opt.temperature, opt.ignore_index
    ignored = ignored_labels(labels, ignore_index)
    in_range = (labels >= 0) & (labels < vocab)
    # int64 for gather: torch < 2.8 takes no int32 index
    safe_labels = torch.where(in_range, labels, torch.zeros_like(labels)).long()

    z = logits.to(compute_dtype(logits.dtype)) / temperature
    # Ignored rows are never looked at: whatever they hold, no NaN reaches any output.
    z = torch.where(ignored.unsqueeze(-1), torch.zeros_like(z), z)
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    outputs = [_mark_rows(logp, in_range, ignored)]
    if return_entropy:
        p = log_p.exp()
        # p log p is 0 where p is 0 (a -inf logit), not 0 * -inf = NaN, in value and gradient.
        log_p_or_zero = torch.where(p > 0, log_p, torch.zeros_like(log_p))
        entropy = -(p * log_p_or_zero).sum(-1)
        outputs.append(_mark_rows(entropy, in_range, ignored))
    if return_sum_p2:
        outputs.append(_mark_rows(torch.logsumexp(2 * log_p, dim=-1), in_range, ignored))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def ignored_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels == ignore_index`` as integers. torch compares an int32 tensor with a Python
    int outside int32's range modulo 2^32 (5 would equal 5 + 2**32); such an ignore_index
    matches no label, as in the kernels, which compare in int64."""
    if not fits_dtype(ignore_index, labels.dtype):
        return torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    return labels == ignore_index


def fits_dtype(value: int, dtype: torch.dtype) -> bool:
    """Whether the int `value` is in the range of the integer `dtype`."""
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def _mark_rows(
    values: torch.Tensor, in_range: torch.Tensor, ignored: torch.Tensor
) -> torch.Tensor:
    """NaN, in value and in the gradient of every logit of the row, for rows with an
    out-of-range label (as the kernels give); a constant 0 (so no gradient reaches their
    logits) for ignored rows."""
    values = values * nan_where(~in_range & ~ignored, values)
    return torch.where(ignored, torch.zeros_like(values), values)



@TOKEN_OPTIONS.keywords
def linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
    bias: torch.Tensor | None = None, return_entropy: bool = False,
    return_sum_p2: bool = False, **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`logprobs` of the materialised logits ``F.linear(hidden, weight, bias)`` (in the
    input dtype, or autocast's, as a model's lm_head computes them). hidden ``[..., D]``,
    weight ``[V, D]``.
    Ignored rows are zeroed first: their hidden state (NaN at fully masked padding, say)
    reaches neither an output nor a gradient. A row with an out-of-range label is NaN, and
    so is its d hidden row, all of d weight and d bias (its NaN d logits row meets every
    vocab row in d logits^T hidden); the other rows' d hidden is unaffected."""
    opt = TOKEN_OPTIONS.fill(options)
    hidden = hidden.masked_fill(ignored_labels(labels, opt.ignore_index).unsqueeze(-1), 0)
    logits = F.linear(hidden, weight, bias)
    return logprobs(logits, labels, return_entropy=return_entropy,
                    return_sum_p2=return_sum_p2, **vars(opt))


def sequence_logps(
    token_logp: torch.Tensor, mask: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """Per-sequence sum (or mean) of the valid tokens' log-probs.

    ``token_logp [..., T]`` float, ``mask [..., T]`` (nonzero = valid). Returns ``[...]``
    fp32 (fp64 for fp64 input). A sequence with no valid token gives 0 (sum and mean).
    Masked entries are never read: a NaN there reaches neither the value nor the gradient.
    """
    valid = mask != 0
    x = token_logp.to(compute_dtype(token_logp.dtype))
    total = torch.where(valid, x, torch.zeros_like(x)).sum(-1)
    if not average:
        return total
    count = valid.sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


@PAIR_LOGPS_OPTIONS.keywords
def pair_logps(token_logp: torch.Tensor, mask: torch.Tensor, *,
               log_sum_p2: torch.Tensor | None = None, **options: Any) -> PairLogps:
    """The sequence log-probs of a stacked preference batch, LD-DPO's and WPO's included.

    ``token_logp``, ``mask``, ``log_sum_p2``: ``[2B, T]``, rows b and B + b the chosen and
    rejected answer of pair b. With n the answer's position among its valid tokens (1, 2,
    ...) and s the pair's shorter length, LD-DPO's sum (TRL's, of the policy and the
    reference alike) is sum_{n <= s} logp + ld_alpha * sum_{n > s} logp. WPO's weight of an
    answer (TRL's use_weighting) is exp(mean over its tokens of logp - log sum_j p_j^2),
    1 for an empty one; a pair's is the product of its two, detached.
    """
    opt = PAIR_LOGPS_OPTIONS.fill(options)
    valid = mask != 0
    x = token_logp.to(compute_dtype(token_logp.dtype))
    x = torch.where(valid, x, torch.zeros_like(x))
    counts = valid.sum(-1)
    pairs = x.shape[0] // 2
    sums, sft_logps = x.sum(-1), None
    if opt.ld_alpha is not None:
        shared = torch.minimum(counts[:pairs], counts[pairs:]).repeat(2)
        tail = valid.cumsum(-1) > shared[:, None]
        sums = torch.where(tail, x * opt.ld_alpha, x).sum(-1)
        sft_logps = x[:pairs].sum(-1)
    weights = None
    if log_sum_p2 is not None:
        with torch.no_grad():
            aligned = x.detach() - log_sum_p2.to(x.dtype)
            mean = torch.where(valid, aligned, torch.zeros_like(aligned)).sum(-1) \
                / counts.clamp(min=1)
            weights = mean[:pairs].exp() * mean[pairs:].exp()
    lengths = counts.to(x.dtype)
    return PairLogps(sums[:pairs], sums[pairs:], lengths[:pairs], lengths[pairs:], sft_logps,
                     weights)
