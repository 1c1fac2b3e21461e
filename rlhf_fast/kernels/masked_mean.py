"""Masked mean: statistics of the valid entries of each row, read once.

  * Pass 1 writes per-block (count, mean, M2) of the valid entries of each row of a [R, L]
    view (M2 around the block's own mean, exact in registers); pass 2, one program per row,
    merges them (Chan et al.) into (count, mean, std). One read of the data. `masked_whiten`
    and `group_advantages` build on these statistics and on `_chan_merge`.
  * Equal values must give a whitened value / advantage of exactly 0: a rounded mean would
    leave s - mean ~ 1e-7 s, and with a std of the same size (against eps = 1e-6) that is an
    advantage of ~0.05. So deviations are taken from a shift the result does not depend on
    (a block's first valid entry, and in the merge the first non-empty part's mean; the
    group's first score in group_advantages), which equal values match exactly: d = 0,
    spread = 0, mean exact. The shifted means also err relative to the spread, not to the
    values' magnitude.
  * M2 is carried as spread^2 * q (see `_chan_merge`), so that values up to fp32's range,
    not ~1e19, give finite statistics.
  * The backward is an elementwise pass: grad / count on valid entries.

Batch invariance: the block depends only on L, so a row's statistics are bit-identical
whatever the other rows are. Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import cast, mask_view, math_dtype, nonzero, num_warps

# The sum of squared deviations M2 of n values overflows fp32 once they pass ~1e19. So M2 is
# kept as spread^2 * q: spread a bound on the deviations (their largest, or a larger
# shift between means), q = M2 / spread^2 <= n. Every fp32 number stays finite as long as
# the values themselves (and their sums) do; no extra pass over the data.


@triton.jit
def _squares_over(d, spread):
    # (d / spread)^2, 0 where spread is 0 (then d is 0 too)
    inv = tl.where(spread > 0, 1.0 / spread, 0.0)
    return (d * inv) * (d * inv)


@triton.jit
def _chan_merge(n_a, mean_a, spread_a, q_a, n_b, mean_b, spread_b, q_b):
    # Chan et al.'s merge of two (count, mean, M2) with M2 = spread^2 * q; counts as floats.
    # Returns (mean, spread, q) of the union.
    frac = n_b / tl.maximum(n_a + n_b, 1.0)
    shift = mean_b - mean_a
    shift_weight = n_a * frac
    # The shift bounds the spread only where it counts: an empty side has mean 0, not data.
    spread = tl.maximum(tl.maximum(spread_a, spread_b),
                        tl.where(shift_weight > 0, tl.abs(shift), 0.0))
    q = (q_a * _squares_over(spread_a, spread) + q_b * _squares_over(spread_b, spread)
         + _squares_over(shift, spread) * shift_weight)
    return mean_a + shift * frac, spread, q


@triton.jit
def _unbiased_std(count, spread, q):
    # sqrt(M2 / (n - 1)) without forming M2; a single entry has std 0.
    return spread * tl.sqrt(q / tl.maximum(count - 1.0, 1.0))


@triton.jit
def _masked_partial_stats_kernel(
    x_ptr, mask_ptr, part_n_ptr, part_mean_ptr, part_spread_ptr, part_q_ptr, L, n_parts,
    WITH_SPREAD: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    offs = part * BLOCK + tl.arange(0, BLOCK)
    inside = offs < L
    ptr_off = row * L + offs
    valid = nonzero(tl.load(mask_ptr + ptr_off, mask=inside, other=0)) & inside
    x = tl.load(x_ptr + ptr_off, mask=valid, other=0.0).to(acc_dtype)
    x = tl.where(valid, x, 0.0)
    n = tl.sum(valid.to(tl.int32), axis=0)
    out = row * n_parts + part
    tl.store(part_n_ptr + out, n)
    if WITH_SPREAD:
        # Around the block's first valid entry (see the module docstring); masked_mean
        # (no spread) keeps the plain sum, whose inf stays inf rather than inf - inf.
        lanes = tl.arange(0, BLOCK)
        first = tl.min(tl.where(valid, lanes, BLOCK), axis=0)
        shift = tl.sum(tl.where(lanes == first, x, 0.0), axis=0)  # 0 without valid entries
        x = tl.where(valid, x - shift, 0.0)
        mean_d = tl.sum(x, axis=0) / tl.maximum(n, 1).to(acc_dtype)
        tl.store(part_mean_ptr + out, shift + mean_d)
        d = tl.where(valid, x - mean_d, 0.0)
        spread = tl.max(tl.abs(d), axis=0)
        tl.store(part_spread_ptr + out, spread)
        tl.store(part_q_ptr + out, tl.sum(_squares_over(d, spread), axis=0))
    else:
        tl.store(part_mean_ptr + out, tl.sum(x, axis=0) / tl.maximum(n, 1).to(acc_dtype))


@triton.jit
def _masked_merge_stats_kernel(
    part_n_ptr, part_mean_ptr, part_spread_ptr, part_q_ptr, count_ptr, mean_ptr, std_ptr,
    n_parts, WITH_SPREAD: tl.constexpr, FP64: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_P)
    count = tl.zeros([], tl.int64)
    mean = tl.zeros([], acc_dtype)
    spread = tl.zeros([], acc_dtype)
    q = tl.zeros([], acc_dtype)
    for start in range(0, n_parts, BLOCK_P):
        idx = start + lanes
        ok = idx < n_parts
        n_i = tl.load(part_n_ptr + row * n_parts + idx, mask=ok, other=0)
        mean_i = tl.load(part_mean_ptr + row * n_parts + idx, mask=ok, other=0.0)
        w_i = n_i.to(acc_dtype)
        n_c = tl.sum(n_i.to(tl.int64), axis=0)
        nf_c = tl.maximum(n_c, 1).to(acc_dtype)
        if WITH_SPREAD:
            # The chunk's parts merged around the chunk mean (exact in registers), then the
            # pairwise merge with the running statistics. The chunk mean is taken around
            # its first non-empty part's mean, so equal means merge exactly.
            first = tl.min(tl.where(n_i > 0, lanes, BLOCK_P), axis=0)
            ref = tl.sum(tl.where(lanes == first, mean_i, 0.0), axis=0)
            d_ref = tl.where(n_i > 0, mean_i - ref, 0.0)
            mean_d = tl.sum(w_i * d_ref, axis=0) / nf_c
            mean_c = ref + mean_d
            spread_i = tl.load(part_spread_ptr + row * n_parts + idx, mask=ok, other=0.0)
            q_i = tl.load(part_q_ptr + row * n_parts + idx, mask=ok, other=0.0)
            d = tl.where(n_i > 0, d_ref - mean_d, 0.0)
            spread_c = tl.maximum(tl.max(spread_i, axis=0), tl.max(tl.abs(d), axis=0))
            q_c = tl.sum(q_i * _squares_over(spread_i, spread_c)
                         + w_i * _squares_over(d, spread_c), axis=0)
            mean, spread, q = _chan_merge(count.to(acc_dtype), mean, spread, q,
                                          n_c.to(acc_dtype), mean_c, spread_c, q_c)
        else:
            mean_c = tl.sum(w_i * mean_i, axis=0) / nf_c
            mean = mean + (mean_c - mean) * (nf_c / tl.maximum(count + n_c, 1).to(acc_dtype))
        count = count + n_c
    tl.store(count_ptr + row, count)
    tl.store(mean_ptr + row, tl.where(count > 0, mean, float("nan")))
    if WITH_SPREAD:
        tl.store(std_ptr + row, _unbiased_std(count.to(acc_dtype), spread, q))


@triton.jit
def _masked_mean_bwd_kernel(
    g_ptr, mask_ptr, count_ptr, dx_ptr, L,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < L
    valid = nonzero(tl.load(mask_ptr + row * L + offs, mask=inside, other=0))
    count = tl.maximum(tl.load(count_ptr + row), 1).to(acc_dtype)  # 0: no valid entry
    scale = tl.load(g_ptr + row).to(acc_dtype) / count
    dx = tl.where(valid, scale, 0.0) + tl.zeros([BLOCK], acc_dtype)
    tl.store(dx_ptr + row * L + offs, cast(dx, dx_ptr.dtype.element_ty), mask=inside)



# ----------------------------------------------------------------- launchers

STATS_BLOCK = 4096
MERGE_BLOCK = 1024


def stats_block(L: int) -> int:
    """Block of the masked-statistics passes over rows of length `L` (a function of L only)."""
    return min(STATS_BLOCK, max(16, triton.next_power_of_2(L)))


def masked_row_stats(
    x: torch.Tensor, mask: torch.Tensor, with_std: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Statistics of the valid entries of each row of contiguous ``x [R, L]`` / ``mask [R, L]``.

    Returns ``(count [R] int64, mean [R], std [R] or None)``; mean and the unbiased (n - 1)
    std in fp32 (fp64 for fp64 x), the std finite wherever x and its sums are (its M2 is
    never formed). A row without valid entries has count 0, mean NaN and std 0. One read
    of the data (two launches: per-block, then merge).
    """
    R, L = x.shape
    dtype = math_dtype(x)
    count = torch.empty(R, dtype=torch.int64, device=x.device)
    mean = torch.empty(R, dtype=dtype, device=x.device)
    std = torch.empty(R, dtype=dtype, device=x.device) if with_std else None
    if R == 0:
        return count, mean, std
    if L == 0:
        count.zero_()
        mean.fill_(float("nan"))
        if std is not None:
            std.zero_()
        return count, mean, std
    block = stats_block(L)
    n_parts = triton.cdiv(L, block)
    part_n = torch.empty((R, n_parts), dtype=torch.int32, device=x.device)
    part_mean = torch.empty((R, n_parts), dtype=dtype, device=x.device)
    # per block: its largest |deviation| and sum of squared deviations over it
    part_spread, part_q = (
        torch.empty((2, R, n_parts), dtype=dtype, device=x.device) if with_std
        else (part_mean, part_mean)
    )
    fp64 = dtype == torch.float64
    _masked_partial_stats_kernel[(R, n_parts)](
        x, mask_view(mask), part_n, part_mean, part_spread, part_q, L, n_parts,
        WITH_SPREAD=with_std, FP64=fp64, BLOCK=block, num_warps=num_warps(block),
    )
    merge_block = min(MERGE_BLOCK, max(16, triton.next_power_of_2(n_parts)))
    _masked_merge_stats_kernel[(R,)](
        part_n, part_mean, part_spread, part_q, count, mean, mean if std is None else std,
        n_parts, WITH_SPREAD=with_std, FP64=fp64, BLOCK_P=merge_block, num_warps=4,
    )
    return count, mean, std


def masked_mean_backward(
    grad: torch.Tensor, mask: torch.Tensor, count: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Gradient ``[R, L]`` (in `dtype`) of the per-row masked means: grad[r] / count[r] on
    valid entries of ``mask [R, L]``, 0 elsewhere."""
    R, L = mask.shape
    dx = torch.empty((R, L), dtype=dtype, device=mask.device)
    if R == 0 or L == 0:
        return dx
    block = stats_block(L)
    _masked_mean_bwd_kernel[(R, triton.cdiv(L, block))](
        grad, mask_view(mask), count, dx, L,
        FP64=math_dtype(grad) == torch.float64, BLOCK=block, num_warps=num_warps(block),
    )
    return dx
