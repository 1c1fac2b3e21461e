"""GAE / discounted returns as a reverse linear scan, group advantages, masked mean / whiten.

GAE over the valid positions of a row (m_t = 1), "next" meaning the next valid position:

    delta_t = r_t + gamma * V_next - V_t          (V_next = last_value after the last one)
    A_t     = delta_t + gamma * lam * A_next      (A_next = 0 after the last one)

Written as a recurrence over *every* position, both carried quantities are affine maps of
their value one position later, so a row is a composition of maps x -> a + c * x:

    U_t  = first valid V at positions >= t       U_t  = m_t ? V_t : U_{t+1}
    S_t  = A at the first valid position >= t    S_t  = m_t ? delta_t + gl * S_{t+1} : S_{t+1}

i.e. (a, c) = (V_t, 0) or (0, 1) for U, and (delta_t, gamma * lam) or (0, 1) for S. V_next at
t is U_{t+1}: the U-scan reads its inputs one position ahead (a second, cache-hitting read of
values and mask), so it yields V_next directly. A_t = S_t on valid positions, 0 elsewhere.
Masked positions are identity maps: left padding, right padding and holes need no special
case, and a masked entry's reward / value is never read into the math (NaN there is harmless).

Kernel design (chosen): one program per row walks the row from its end in blocks of BLOCK_T
positions. Inside a block both recurrences are evaluated by `tl.associative_scan` over the
(a, c) pairs with the composition (a1, c1) then (a2, c2) = (a2 + c2 * a1, c1 * c2); the
carried U and S from the later block enter as the argument of the composed maps, and the
block's last lane (its earliest position) is the carry into the next block. The block is
loaded at descending addresses (lane i = position end - 1 - i) and scanned *forward*: the
reverse= flag of associative_scan is avoided on purpose, because its argument order for
non-commutative combines has differed between Triton versions and backends (triton-lang/triton
issue 4362), while the forward order (combine(earlier, later)) is the documented one. The
descending loads are still contiguous, so they coalesce.

Why not the per-row sequential loop: at B = 512, T = 4096 on an H100 that is 512 programs of
4096 dependent scalar steps each, every step a load-to-use latency (hundreds of cycles) with
no parallelism inside the program: ~1e6 cycles, about a millisecond. The block scan does
T / BLOCK_T = 4 iterations of two log2(1024) = 10-level scans, each on a whole block loaded
at once: the kernel becomes bandwidth-bound (a few MB moved, a few microseconds). A layout
with several rows per program would only help when B is far below the SM count; GAE at such
sizes is launch-bound anyway. Not measured (no GPU where this was written): reasoning only.

Batch invariance: one program per row, BLOCK_T depends only on T, so a row's outputs are
bit-identical whatever the other rows and B are. Offsets are int64.

Precision: fp32 math (fp64 for fp64 inputs). Scalar float kernel arguments are fp32 in
Triton, so gamma and gamma * lam are passed as a (hi, lo) pair of fp32 and summed in the
kernel: ~48 bits, enough for the fp64 path.

The other kernels here are plain reductions:
  * group advantages: one program per tile of groups; Chan-merged (count, mean, M2) over
    chunks of a group, then a second, cache-hitting read that writes (s - mean) / (std + eps).
  * masked statistics: pass 1 writes per-block (count, mean, M2) of the valid entries of each
    row of a [R, L] view (M2 around the block's own mean, exact in registers); pass 2, one
    program per row, merges them (Chan et al.) into (count, mean, std). One read of the data.
  * Equal values must give an advantage / whitened value of exactly 0: a rounded mean would
    leave s - mean ~ 1e-7 s, and with a std of the same size (against eps = 1e-6) that is an
    advantage of ~0.05. So deviations are taken from a shift the result does not depend on
    (the group's first score; a block's first valid entry, and in the merge the first
    non-empty part's mean), which equal values match exactly: d = 0, spread = 0, mean exact.
    The shifted means also err relative to the spread, not to the values' magnitude.
  * M2 is carried as spread^2 * q (see `_chan_merge`), so that values up to fp32's range,
    not ~1e19, give finite statistics.
  * whiten / its backward and the masked-mean backward: elementwise passes on those stats.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import cast, fp64_arg, mask_view, nonzero, split_fp64


@triton.jit
def _compose(a1, c1, a2, c2):
    # Scan elements are affine maps x -> a + c * x, in the order they are applied: map 1
    # (nearer the row's end) first, then map 2. Their composition is x -> a2 + c2 * (a1 + c1 x).
    return a2 + c2 * a1, c1 * c2


@triton.jit
def _gae_kernel(
    rewards_ptr, values_ptr, mask_ptr, last_value_ptr, adv_ptr, ret_ptr,
    T, gamma_hi, gamma_lo, gl_hi, gl_lo,
    HAS_VALUES: tl.constexpr, HAS_LAST_VALUE: tl.constexpr, STORE_ADV: tl.constexpr,
    FP64: tl.constexpr, BLOCK_T: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    gamma = fp64_arg(gamma_hi, gamma_lo, acc_dtype)
    gl = fp64_arg(gl_hi, gl_lo, acc_dtype)
    v_carry = tl.zeros([], acc_dtype)  # first valid V after the block (U one step later)
    if HAS_LAST_VALUE:
        v_carry = tl.load(last_value_ptr + row).to(acc_dtype)
    s_carry = tl.zeros([], acc_dtype)  # A at the first valid position after the block
    lanes = tl.arange(0, BLOCK_T)
    for start in range(0, T, BLOCK_T):
        pos = T - 1 - start - lanes  # descending positions: lane 0 is the block's latest
        inside = pos >= 0
        valid = nonzero(tl.load(mask_ptr + base + pos, mask=inside, other=0))
        r = tl.load(rewards_ptr + base + pos, mask=valid, other=0.0).to(acc_dtype)

        # U-scan on inputs one position ahead: lane i gets the first valid V after pos.
        nxt = pos + 1
        nxt_inside = inside & (nxt < T)
        nxt_valid = nonzero(tl.load(mask_ptr + base + nxt, mask=nxt_inside, other=0))
        if HAS_VALUES:
            v = tl.load(values_ptr + base + pos, mask=valid, other=0.0).to(acc_dtype)
            v_ahead = tl.load(values_ptr + base + nxt, mask=nxt_valid, other=0.0).to(acc_dtype)
        else:
            v = tl.zeros([BLOCK_T], acc_dtype)
            v_ahead = tl.zeros([BLOCK_T], acc_dtype)
        u_a, u_c = tl.associative_scan(
            (tl.where(nxt_valid, v_ahead, 0.0), tl.where(nxt_valid, 0.0, 1.0).to(acc_dtype)),
            0, _compose,
        )
        # u_c is exactly 0 or 1: select rather than multiply, so an inf carry is not 0 * inf.
        v_next = tl.where(u_c == 0.0, u_a, v_carry)

        delta = r + gamma * v_next - v
        s_a, s_c = tl.associative_scan(
            (tl.where(valid, delta, 0.0), tl.where(valid, gl, 1.0).to(acc_dtype)), 0, _compose
        )
        s = s_a + s_c * s_carry
        out_ptr_off = base + pos
        if STORE_ADV:
            tl.store(adv_ptr + out_ptr_off, tl.where(valid, s, 0.0), mask=inside)
        tl.store(ret_ptr + out_ptr_off, tl.where(valid, s + v, 0.0), mask=inside)

        last = lanes == BLOCK_T - 1  # the block's earliest position carries into the next
        v_carry = tl.sum(tl.where(last, v_next, 0.0), axis=0)
        s_carry = tl.sum(tl.where(last, s, 0.0), axis=0)


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
def _whiten_stats(count_ptr, mean_ptr, std_ptr, eps_hi, eps_lo):
    mean = tl.load(mean_ptr)
    count = tl.load(count_ptr).to(mean.dtype)
    # 1 / sqrt(std^2 + eps) with std^2 never formed (it overflows fp32 past std ~ 1e19):
    # both terms scaled by the larger of std and sqrt(eps).
    std = tl.load(std_ptr)
    root_eps = tl.sqrt(fp64_arg(eps_hi, eps_lo, mean.dtype))
    big = tl.maximum(std, root_eps)
    rstd = 1.0 / (big * tl.sqrt((std / big) * (std / big) + (root_eps / big) * (root_eps / big)))
    return count, mean, rstd


@triton.jit
def _whiten_fwd_kernel(
    x_ptr, mask_ptr, count_ptr, mean_ptr, std_ptr, out_ptr, N, eps_hi, eps_lo,
    SHIFT_MEAN: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    valid = nonzero(tl.load(mask_ptr + offs, mask=inside, other=0))
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    _, mean, rstd = _whiten_stats(count_ptr, mean_ptr, std_ptr, eps_hi, eps_lo)
    y = (x - mean) * rstd
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, tl.where(valid, y, 0.0), mask=inside)


@triton.jit
def _whiten_bwd_partial_kernel(
    g_ptr, x_ptr, mask_ptr, count_ptr, mean_ptr, std_ptr, part_ptr, N, n_parts, eps_hi, eps_lo,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    part = tl.program_id(0)
    offs = part.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    valid = nonzero(tl.load(mask_ptr + offs, mask=inside, other=0))
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    _, mean, rstd = _whiten_stats(count_ptr, mean_ptr, std_ptr, eps_hi, eps_lo)
    g = tl.where(valid, g, 0.0)
    xhat = tl.where(valid, (x - mean) * rstd, 0.0)
    tl.store(part_ptr + part, tl.sum(g, axis=0))
    tl.store(part_ptr + n_parts + part, tl.sum(g * xhat, axis=0))


@triton.jit
def _whiten_bwd_kernel(
    g_ptr, x_ptr, mask_ptr, count_ptr, mean_ptr, std_ptr, sums_ptr, dx_ptr, N, eps_hi, eps_lo,
    SHIFT_MEAN: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    valid = nonzero(tl.load(mask_ptr + offs, mask=inside, other=0))
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    count, mean, rstd = _whiten_stats(count_ptr, mean_ptr, std_ptr, eps_hi, eps_lo)
    g_mean = tl.load(sums_ptr) / tl.maximum(count, 1.0)
    gx_term = tl.load(sums_ptr + 1) / tl.maximum(count - 1.0, 1.0)
    xhat = (x - mean) * rstd
    # d/dx_i of (x - mean) / sqrt(var + eps) with var = sum (x - mean)^2 / (n - 1).
    dx = rstd * (g - g_mean - xhat * gx_term)
    if not SHIFT_MEAN:
        dx += g_mean
    dx = tl.where(valid, dx, 0.0)
    tl.store(dx_ptr + offs, cast(dx, dx_ptr.dtype.element_ty), mask=inside)


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

MAX_BLOCK_T = 1024
STATS_BLOCK = 4096
MERGE_BLOCK = 1024
GROUP_TILE = 2048


def block_size_t(T: int) -> int:
    """BLOCK_T for rows of `T` positions: a function of T alone (batch invariance)."""
    return min(MAX_BLOCK_T, max(16, triton.next_power_of_2(T)))


def _num_warps(block: int) -> int:
    return 8 if block >= 4096 else 4 if block >= 512 else 2


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gae_forward(
    rewards: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    last_value: torch.Tensor | None,
    gamma: float,
    lam: float,
    store_advantages: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """GAE over contiguous ``[B, T]`` rewards / values / mask (values None: all zero).

    `last_value` is ``[B]`` (contiguous) or None (0). Returns ``(advantages, returns)``, both
    ``[B, T]`` fp32 (fp64 if rewards or values are fp64); advantages is None unless
    `store_advantages`. One launch, one program per row.
    """
    B, T = rewards.shape
    dtype = _acc_dtype(rewards, *(() if values is None else (values,)))
    ret = torch.empty((B, T), dtype=dtype, device=rewards.device)
    adv = torch.empty_like(ret) if store_advantages else None
    if B == 0 or T == 0:
        return adv, ret
    block = block_size_t(T)
    gamma_hi, gamma_lo = split_fp64(float(gamma))
    gl_hi, gl_lo = split_fp64(float(gamma) * float(lam))
    _gae_kernel[(B,)](
        rewards, rewards if values is None else values, mask_view(mask),
        rewards if last_value is None else last_value,
        ret if adv is None else adv, ret,
        T, gamma_hi, gamma_lo, gl_hi, gl_lo,
        HAS_VALUES=values is not None, HAS_LAST_VALUE=last_value is not None,
        STORE_ADV=store_advantages, FP64=dtype == torch.float64,
        BLOCK_T=block, num_warps=_num_warps(block),
    )
    return adv, ret


def group_advantages_forward(
    scores: torch.Tensor, group_size: int, scale_std: bool, eps: float
) -> torch.Tensor:
    """Advantages ``[B]`` of contiguous ``scores [B]`` in groups of `group_size` consecutive
    entries; fp32 (fp64 for fp64 scores). One launch."""
    out = torch.empty(scores.shape, dtype=_acc_dtype(scores), device=scores.device)
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
    dtype = _acc_dtype(x)
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
        WITH_SPREAD=with_std, FP64=fp64, BLOCK=block, num_warps=_num_warps(block),
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
        FP64=_acc_dtype(grad) == torch.float64, BLOCK=block, num_warps=_num_warps(block),
    )
    return dx


def masked_whiten_forward(
    x: torch.Tensor,
    mask: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    shift_mean: bool,
    eps: float,
) -> torch.Tensor:
    """Whitened contiguous flat ``x [N]`` from its (count, mean, std) ``[1]`` each; fp32 (fp64
    for fp64 x); 0 where ``mask [N]`` is 0."""
    (N,) = x.shape
    out = torch.empty(N, dtype=_acc_dtype(x), device=x.device)
    if N == 0:
        return out
    _whiten_fwd_kernel[(triton.cdiv(N, STATS_BLOCK),)](
        x, mask_view(mask), *stats, out, N, *split_fp64(float(eps)),
        SHIFT_MEAN=shift_mean, FP64=out.dtype == torch.float64,
        BLOCK=STATS_BLOCK, num_warps=_num_warps(STATS_BLOCK),
    )
    return out


def masked_whiten_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    shift_mean: bool,
    eps: float,
) -> torch.Tensor:
    """Gradient w.r.t. flat ``x [N]`` (in x's dtype) of masked_whiten, from ``grad [N]``.

    Two reads of (grad, x, mask): per-block sums of g and g * xhat over valid entries (summed
    in torch, a few hundred numbers), then the elementwise gradient.
    """
    (N,) = x.shape
    dx = torch.empty(N, dtype=x.dtype, device=x.device)
    if N == 0:
        return dx
    n_parts = triton.cdiv(N, STATS_BLOCK)
    fp64 = _acc_dtype(x) == torch.float64
    parts = torch.empty((2, n_parts), dtype=_acc_dtype(x), device=x.device)
    mask = mask_view(mask)
    _whiten_bwd_partial_kernel[(n_parts,)](
        grad, x, mask, *stats, parts, N, n_parts, *split_fp64(float(eps)),
        FP64=fp64, BLOCK=STATS_BLOCK, num_warps=_num_warps(STATS_BLOCK),
    )
    sums = parts.sum(dim=1)
    _whiten_bwd_kernel[(n_parts,)](
        grad, x, mask, *stats, sums, dx, N, *split_fp64(float(eps)),
        SHIFT_MEAN=shift_mean, FP64=fp64, BLOCK=STATS_BLOCK, num_warps=_num_warps(STATS_BLOCK),
    )
    return dx
