"""Group advantages (GRPO): (s - mean) / (std + eps) over groups of consecutive scores.

One program per tile of groups: Chan-merged (count, mean, M2) over chunks of a group (the
merge of `masked_mean`, M2 carried as spread^2 * q), then a second, cache-hitting read that
writes the advantages. Deviations are taken from the group's first score, so that equal
scores give exactly 0 (see `masked_mean`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import fp64_arg, math_dtype, split_fp64
from rlhf_fast.kernels.masked_mean import _chan_merge, _squares_over, _unbiased_std


@triton.jit
def _group_advantages_kernel(
    scores_ptr, out_ptr, n_groups, group_size, eps_hi, eps_lo,
    SCALE_STD: tl.constexpr, FP64: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
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
    # mean, spread and q are those of the shifted scores x - shift
    scale = tl.full([BLOCK_G], 1.0, acc_dtype)
    if SCALE_STD:
        # Unbiased (n - 1) std, as torch.std; a group of one has std 0 (and advantage 0).
        eps = fp64_arg(eps_hi, eps_lo, acc_dtype)
        scale = 1.0 / (_unbiased_std(count, spread, q) + eps)
    for start in range(0, group_size, BLOCK_S):
        offs = start + cols
        ok = group_ok[:, None] & (offs < group_size)[None, :]
        x = tl.load(scores_ptr + base[:, None] + offs[None, :], mask=ok, other=0.0)
        adv = ((x.to(acc_dtype) - shift[:, None]) - mean[:, None]) * scale[:, None]
        tl.store(out_ptr + base[:, None] + offs[None, :], adv, mask=ok)



# ----------------------------------------------------------------- launchers

GROUP_TILE = 2048


def group_advantages_forward(
    scores: torch.Tensor, group_size: int, scale_std: bool, eps: float
) -> torch.Tensor:
    """Advantages ``[B]`` of contiguous ``scores [B]`` in groups of `group_size` consecutive
    entries; fp32 (fp64 for fp64 scores). One launch."""
    out = torch.empty(scores.shape, dtype=math_dtype(scores), device=scores.device)
    n_groups = scores.numel() // group_size if group_size > 0 else 0
    if n_groups == 0:
        return out
    block_s = min(GROUP_TILE // 2, triton.next_power_of_2(group_size))
    block_g = max(1, GROUP_TILE // block_s)
    _group_advantages_kernel[(triton.cdiv(n_groups, block_g),)](
        scores, out, n_groups, group_size, *split_fp64(float(eps)),
        SCALE_STD=scale_std, FP64=out.dtype == torch.float64,
        BLOCK_G=block_g, BLOCK_S=block_s, num_warps=4,
    )
    return out
