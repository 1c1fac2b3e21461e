"""Helpers shared by the kernel files: jit functions for loads and stores, the loss
reductions of the preference-loss kernels (`loss_step`, `pair_step`, `upstream_grad`),
and launcher helpers (plain Python)."""

from __future__ import annotations

import functools
import math
import os
import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def fp64_arg(hi, lo, acc_dtype: tl.constexpr):
    """A float setting from its `split_fp64` halves (Triton takes float arguments as fp32:
    a clip bound of 1 - fp32(0.2) would be 1e-8 off in the fp64 path)."""
    return (tl.zeros([], acc_dtype) + hi) + lo


@triton.jit
def fp64_args3(a_hi, a_lo, b_hi, b_lo, c_hi, c_lo, acc_dtype: tl.constexpr):
    """Three `fp64_arg` settings."""
    return (fp64_arg(a_hi, a_lo, acc_dtype), fp64_arg(b_hi, b_lo, acc_dtype),
            fp64_arg(c_hi, c_lo, acc_dtype))


@triton.jit
def block_at(start, B, BLOCK: tl.constexpr):
    """(offsets, in-batch mask) of the block of BLOCK elements from `start`."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < B

# The preference-loss kernels' reductions, by REDUCTION code (`kernels.dpo_loss`
# REDUCTION_CODES): 0 the mean over the batch, 1 the sum, 2 none (a loss per element).


@triton.jit
def loss_step(loss_ptr, offs, ok, loss, s_loss, REDUCTION: tl.constexpr):
    """One block of a forward's loop over the batch: the elements' `loss` stored (no
    reduction), and the running sum `s_loss` plus it (0 past the batch)."""
    if REDUCTION == 2:
        tl.store(loss_ptr + offs, loss, mask=ok)
    return s_loss + tl.where(ok, loss, 0.0)


@triton.jit
def store_reduced_loss(loss_ptr, s_loss, B, REDUCTION: tl.constexpr):
    """After the loop: the mean (or the sum) of the running sums `s_loss` stored."""
    total = tl.sum(s_loss, axis=0)
    if REDUCTION == 0:
        tl.store(loss_ptr, total / B)
    elif REDUCTION == 1:
        tl.store(loss_ptr, total)


@triton.jit
def pair_sums(acc_dtype: tl.constexpr, BLOCK: tl.constexpr):
    """`pair_step`'s running sums, zero: loss, correct pairs, reward margins."""
    return (tl.zeros([BLOCK], acc_dtype), tl.zeros([BLOCK], acc_dtype),
            tl.zeros([BLOCK], acc_dtype))

@triton.jit
def pair_step(loss_ptr, chosen_reward_ptr, rejected_reward_ptr, offs, ok, loss,
              chosen_reward, rejected_reward, s_loss, s_correct, s_margin,
              REDUCTION: tl.constexpr):
    """`loss_step` of a pair loss, its pairs' rewards stored too: the running sums of the
    loss, of the pairs whose chosen reward is the larger and of the reward margins."""
    tl.store(chosen_reward_ptr + offs, chosen_reward, mask=ok)
    tl.store(rejected_reward_ptr + offs, rejected_reward, mask=ok)
    s_loss = loss_step(loss_ptr, offs, ok, loss, s_loss, REDUCTION)
    s_correct += tl.where(ok & (chosen_reward > rejected_reward), 1.0, 0.0)
    s_margin += tl.where(ok, chosen_reward - rejected_reward, 0.0)
    return s_loss, s_correct, s_margin


@triton.jit
def store_pair_totals(loss_ptr, stats_ptr, s_loss, s_correct, s_margin, B,
                      REDUCTION: tl.constexpr):
    """After `pair_step`'s loop: the reduced loss, and stats[0:2] = (accuracy, mean
    reward margin)."""
    store_reduced_loss(loss_ptr, s_loss, B, REDUCTION)
    tl.store(stats_ptr + 0, tl.sum(s_correct, axis=0) / B)
    tl.store(stats_ptr + 1, tl.sum(s_margin, axis=0) / B)


@triton.jit
def upstream_grad(grad_ptr, offs, ok, B, acc_dtype: tl.constexpr, REDUCTION: tl.constexpr):
    """The upstream gradient of each element's loss: its own (no reduction), or the
    reduced loss's (over B for the mean)."""
    if REDUCTION == 2:
        g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
    elif REDUCTION == 0:
        g = tl.load(grad_ptr).to(acc_dtype) / B
    else:
        g = tl.load(grad_ptr).to(acc_dtype)
    return g

@triton.jit
def nonzero(x):
    """x != 0, bf16 compared as fp32. Compiled, the two are the same (the cast is exact);
    Triton's interpreter (3.9 at least) compares bf16 on its raw bits, so a -0.0 mask
    entry would count as set."""
    if x.dtype == tl.bfloat16:
        x = x.to(tl.float32)
    return x != 0


@triton.jit
def cast(x, dtype: tl.constexpr):
    """x.to(dtype), fp64 to bf16 rounded through fp32 as torch rounds it (c10's BFloat16
    is built from a float). Triton's interpreter (3.8 and 3.9) gets the direct cast wrong
    (1.0 becomes 9.2e-41)."""
    if x.dtype == tl.float64 and dtype == tl.bfloat16:
        x = x.to(tl.float32)
    return x.to(dtype)


@triton.jit
def log2(x, FAST: tl.constexpr):
    """log2 x; with FAST (see `fast_log2`) lg2.approx: one MUFU.LG2 (relative error about
    2^-22) for libdevice's exact fp32 polynomial (about 30 instructions)."""
    if FAST:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


def fast_log2(dtype: torch.dtype) -> bool:
    """Whether `log2` may approximate: fp32 math in a compiled kernel for an NVIDIA GPU
    (fp64 keeps every bit; Triton's interpreter has no libdevice)."""
    return (dtype == torch.float32 and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and torch.version.hip is None)


@functools.lru_cache(maxsize=4096)  # a launch's settings repeat from step to step
def split_fp64(value: float) -> tuple[float, float]:
    """(hi, lo) fp32 values with hi + lo == value to ~48 bits (Triton float args are fp32).

    A kernel rebuilds the value with `fp64_arg`, ``(tl.zeros([], acc_dtype) + hi) + lo``:
    exact enough for fp64 accumulation, and just `hi` in fp32.
    """
    hi = fp32(value)
    # lo rounded here, not by Triton, so the interpreter sees what a compiled kernel gets
    return hi, fp32(value - hi) if math.isfinite(value) else 0.0  # inf - inf is NaN


def fp32(value: float) -> float:
    """The Python float nearest to `value` that fp32 holds (what Triton passes a kernel)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def mask_view(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask read as bytes (same storage, no copy); other dtypes unchanged."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def num_warps(block: int) -> int:
    """Warps for a program over `block` elements of a streaming pass."""
    return 8 if block >= 4096 else 4 if block >= 512 else 2


def math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 math if any input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
