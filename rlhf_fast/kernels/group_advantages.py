"""Group (outcome) advantages: each score against its group's baseline, one launch.

Per group of n consecutive scores s, with d = s - s_0 (the group's first score: equal
scores give exactly 0) and the group's mean, std (unbiased) of d:

    grpo        (d - mean) * scale, scale 1 / (std + eps), 1 / (batch std + eps) or 1
    rloo        (d - mean) * n / (n - 1)
    opo         d - sum(len d) / sum(len)           (the plain mean if sum(len) = 0)
    grpo_passk  (max - second max) * scale at the best sample, 0 elsewhere
    gpg         (d - mean) * alpha,  alpha = B / nonzero scores (from the caller)
    n = 1       0

One program per tile of groups: Chan-merged (count, mean, M2) over chunks of a group (the
merge of `masked_mean`, M2 carried as spread^2 * q), with the length-weighted sums and
the top two of the group, then a second, cache-hitting read that writes the advantages.
The batch statistics (the batch std, gpg's alpha) come in as a 0-d tensor: no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import fp64_arg, math_dtype, split_fp64
from rlhf_fast.kernels.masked_mean import _chan_merge, _squares_over, _unbiased_std


@triton.jit
def _top_two(top1, top2, x):
    # The largest two of a set and of x's rows (x < top2 elsewhere: -inf padding).
    x1 = tl.max(x, axis=1)
    ties = tl.sum(tl.where(x == x1[:, None], 1.0, 0.0), axis=1)
    x2 = tl.where(ties > 1, x1, tl.max(tl.where(x < x1[:, None], x, -float("inf")), axis=1))
    return tl.maximum(top1, x1), tl.maximum(tl.minimum(top1, x1), tl.maximum(top2, x2))


@triton.jit
def _group_advantages_kernel(
    scores_ptr, lengths_ptr, batch_ptr, out_ptr, n_groups, group_size, eps_hi, eps_lo,
    ESTIMATOR: tl.constexpr, SCALE: tl.constexpr, FP64: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # ESTIMATOR: 0 grpo, 1 rloo, 2 opo, 3 grpo_passk, 4 gpg; SCALE: 0 none, 1 std, 2 batch
    acc_dtype = tl.float64 if FP64 else tl.float32
    groups = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    group_ok = groups < n_groups
    base = groups.to(tl.int64) * group_size
    cols = tl.arange(0, BLOCK_S)
    shift = tl.load(scores_ptr + base, mask=group_ok, other=0.0).to(acc_dtype)
    count = tl.zeros([], acc_dtype)
    mean = tl.zeros([BLOCK_G], acc_dtype)
    spread = tl.zeros([BLOCK_G], acc_dtype)
    q = tl.zeros([BLOCK_G], acc_dtype)
    weighted = tl.zeros([BLOCK_G], acc_dtype)
    weight = tl.zeros([BLOCK_G], acc_dtype)
    top1 = tl.full([BLOCK_G], -float("inf"), acc_dtype)
    top2 = tl.full([BLOCK_G], -float("inf"), acc_dtype)
    nans = tl.zeros([BLOCK_G], acc_dtype)
    for start in range(0, group_size, BLOCK_S):
        offs = start + cols
        ok = group_ok[:, None] & (offs < group_size)[None, :]
        x = tl.load(scores_ptr + base[:, None] + offs[None, :], mask=ok, other=0.0)
        x = tl.where(ok, x.to(acc_dtype) - shift[:, None], 0.0)
        n_b = tl.minimum(group_size - start, BLOCK_S).to(acc_dtype)
        mean_b = tl.sum(x, axis=1) / n_b
        d = tl.where(ok, x - mean_b[:, None], 0.0)
        spread_b = tl.max(tl.abs(d), axis=1)
        q_b = tl.sum(_squares_over(d, spread_b[:, None]), axis=1)
        mean, spread, q = _chan_merge(count, mean, spread, q, n_b, mean_b, spread_b, q_b)
        count = count + n_b
        if ESTIMATOR == 2:
            w = tl.load(lengths_ptr + base[:, None] + offs[None, :], mask=ok, other=0.0)
            weighted += tl.sum(w.to(acc_dtype) * x, axis=1)
            weight += tl.sum(w.to(acc_dtype), axis=1)
        if ESTIMATOR == 3:
            top1, top2 = _top_two(top1, top2, tl.where(ok, x, -float("inf")))
            nans += tl.sum(tl.where(x != x, 1.0, 0.0), axis=1)
    # mean, spread and q are those of the shifted scores x - shift
    scale = tl.full([BLOCK_G], 1.0, acc_dtype)
    eps = fp64_arg(eps_hi, eps_lo, acc_dtype)
    if SCALE == 1:
        # Unbiased (n - 1) std, as torch.std; a group of one has std 0 (and advantage 0).
        scale = 1.0 / (_unbiased_std(count, spread, q) + eps)
    elif SCALE == 2:
        scale = scale / (tl.load(batch_ptr).to(acc_dtype) + eps)
    if ESTIMATOR == 1:
        scale = tl.where(count > 1, count / tl.maximum(count - 1.0, 1.0), 0.0) + tl.zeros_like(mean)
    elif ESTIMATOR == 4:
        scale = tl.load(batch_ptr).to(acc_dtype) + tl.zeros_like(mean)
    if ESTIMATOR == 2:
        mean = tl.where(weight > 0, weighted / tl.where(weight > 0, weight, 1.0), mean)
    if ESTIMATOR == 3:
        gap = tl.where(nans > 0, float("nan"), tl.where(count > 1, (top1 - top2) * scale, 0.0))
    for start in range(0, group_size, BLOCK_S):
        offs = start + cols
        ok = group_ok[:, None] & (offs < group_size)[None, :]
        x = tl.load(scores_ptr + base[:, None] + offs[None, :], mask=ok, other=0.0)
        x = x.to(acc_dtype) - shift[:, None]
        if ESTIMATOR == 3:
            adv = tl.where(x == top1[:, None], gap[:, None], 0.0)
            adv = tl.where(nans[:, None] > 0, float("nan"), adv)
        else:
            adv = (x - mean[:, None]) * scale[:, None]
        tl.store(out_ptr + base[:, None] + offs[None, :], adv, mask=ok)


# ----------------------------------------------------------------- launchers

GROUP_TILE = 2048


ESTIMATOR_CODES = {"grpo": 0, "rloo": 1, "opo": 2, "grpo_passk": 3, "gpg": 4}
SCALE_CODES = {None: 0, "std": 1, "batch": 2}


def group_advantages_forward(
    scores: torch.Tensor, group_size: int, estimator: str, scale: str | None, eps: float,
    lengths: torch.Tensor | None = None, batch_statistic: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages ``[B]`` of contiguous ``scores [B]`` in groups of `group_size` consecutive
    entries; fp32 (fp64 for fp64 scores). `lengths` [B] for opo; `batch_statistic` a 0-d
    tensor: the batch's std for scale "batch", gpg's alpha. One launch."""
    out = torch.empty(scores.shape, dtype=math_dtype(scores), device=scores.device)
    n_groups = scores.numel() // group_size if group_size > 0 else 0
    if n_groups == 0:
        return out
    block_s = min(GROUP_TILE // 2, triton.next_power_of_2(group_size))
    block_g = max(1, GROUP_TILE // block_s)
    reads_scale = estimator in ("grpo", "grpo_passk")
    _group_advantages_kernel[(triton.cdiv(n_groups, block_g),)](
        scores, scores if lengths is None else lengths,
        scores if batch_statistic is None else batch_statistic, out, n_groups, group_size,
        *split_fp64(float(eps)),
        ESTIMATOR=ESTIMATOR_CODES[estimator], SCALE=SCALE_CODES[scale] if reads_scale else 0,
        FP64=out.dtype == torch.float64, BLOCK_G=block_g, BLOCK_S=block_s, num_warps=4,
    )
    return out
