"""GAE (and discounted returns, GAE with no values and lambda 1) as a reverse linear scan.

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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import (
    fp64_arg,
    mask_view,
    math_dtype,
    nonzero,
    num_warps,
    split_fp64,
)


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



# ----------------------------------------------------------------- launchers

MAX_BLOCK_T = 1024


def block_size_t(T: int) -> int:
    """BLOCK_T for rows of `T` positions: a function of T alone (batch invariance)."""
    return min(MAX_BLOCK_T, max(16, triton.next_power_of_2(T)))


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
    dtype = math_dtype(rewards, *(() if values is None else (values,)))
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
        BLOCK_T=block, num_warps=num_warps(block),
    )
    return adv, ret
