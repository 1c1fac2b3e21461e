"""`rlhf_fast.gae`, `discounted_returns`, `group_advantages`, `masked_mean`, `masked_whiten`.

Conventions shared by these ops:

* Masks: same shape as the data, bool or any numeric dtype; a nonzero entry is valid.
* Outputs are fp32 whatever the input dtype (fp64 for fp64 inputs), exactly 0 at masked
  positions (gae, discounted_returns, masked_whiten).
* Variance: unbiased (divide by n - 1) everywhere, as ``torch.std`` and TRL's
  ``masked_whiten``; a single valid entry (or a group of one) has variance 0.
* Autograd: `masked_mean` and `masked_whiten` are differentiable w.r.t. `x` (gradient in
  x's dtype, through the mean and the std). `gae`, `discounted_returns` and
  `group_advantages` return detached tensors (they are computed under no_grad in a
  trainer; no gradient reaches rewards, values or scores), on every backend.
* A mean over no valid entry: `masked_mean(dim=None)` and `masked_whiten` raise ValueError
  naming `mask` when ``check_mask`` is on (default on CPU, where the check costs no device
  sync, off on CUDA). Unchecked, `masked_mean` returns NaN and `masked_whiten` returns
  zeros (every position is masked). Along a `dim`, a slice without valid entries is NaN.
"""

from __future__ import annotations

import math

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import gae as kernel
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    MASK_DTYPES,
    check_bool,
    check_int,
    check_positive,
    check_same_device,
    check_same_shape,
    check_tensor,
    check_unit_interval,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton

# ----------------------------------------------------------------- checks


def _check_2d(name: str, value: torch.Tensor) -> None:
    if value.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got {tuple(value.shape)}")


def _check_mask(mask: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    check_tensor("mask", mask, MASK_DTYPES)
    check_same_shape("mask", mask, like_name, like)
    check_same_device("mask", mask, like_name, like)


def _check_last_value(last_value: torch.Tensor | None, rewards: torch.Tensor) -> None:
    if last_value is None:
        return
    check_tensor("last_value", last_value, FLOAT_DTYPES)
    check_same_device("last_value", last_value, "rewards", rewards)
    if tuple(last_value.shape) != (rewards.shape[0],):
        raise ValueError(
            f"last_value must have shape [B] = ({rewards.shape[0]},) (rewards.shape[0]), "
            f"got {tuple(last_value.shape)}"
        )


def _check_some_valid(mask: torch.Tensor, check_mask: bool | None) -> None:
    if check_mask is None:
        check_mask = not mask.is_cuda
    if check_mask and not bool((mask != 0).any()):
        raise ValueError(
            f"mask must have at least one valid (nonzero) entry, got none of {mask.numel()}"
        )


# ----------------------------------------------------------------- GAE


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    last_value: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid tokens of each sequence, fused.

    Over the valid positions of a row, "next" meaning the next *valid* position (masked
    positions are skipped, so left padding, right padding and holes all work):
    delta_t = r_t + gamma * V_next - V_t, A_t = delta_t + gamma * lam * A_next, with
    V_next = `last_value` (or 0) and A_next = 0 after the last valid token.
    One kernel launch for the whole batch: a reverse linear scan per row.

    Args:
        rewards: ``[B, T]`` bf16, fp16, fp32 or fp64 (computed in fp32, fp64 for fp64).
        values: ``[B, T]`` float, the critic's V_t.
        mask: ``[B, T]`` bool or any numeric dtype; nonzero = valid token.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].
        last_value: optional ``[B]`` float, the value after each row's last valid token
            (bootstrap for truncated sequences); default 0.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` fp32 (fp64 if rewards or values are
        fp64), returns = advantages + values; exactly 0 at masked positions. Detached: no
        gradient flows to the inputs. B = 0 or T = 0 gives empty outputs. A NaN / inf at a
        valid position makes that row's outputs at and before it non-finite (as the
        recurrence implies); other rows and masked entries are never affected.
    """
    check_tensor("rewards", rewards, FLOAT_DTYPES)
    check_tensor("values", values, FLOAT_DTYPES)
    _check_2d("rewards", rewards)
    check_same_shape("values", values, "rewards", rewards)
    check_same_device("values", values, "rewards", rewards)
    _check_mask(mask, "rewards", rewards)
    _check_last_value(last_value, rewards)
    gamma = check_unit_interval("gamma", gamma)
    lam = check_unit_interval("lam", lam)

    if not use_triton(rewards):
        with torch.no_grad():
            return reference.gae(
                rewards, values, mask, gamma=gamma, lam=lam, last_value=last_value
            )
    adv, ret = kernel.gae_forward(
        rewards.detach().contiguous(),
        values.detach().contiguous(),
        mask.contiguous(),
        None if last_value is None else last_value.detach().contiguous(),
        gamma,
        lam,
    )
    return adv, ret


def discounted_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    last_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Discounted return R_t = r_t + gamma * R_next over the valid tokens of each row.

    The GAE kernel with lam = 1 and no values. R_next after a row's last valid token is
    `last_value` (or 0); masked positions are skipped as in `gae`.

    Args:
        rewards: ``[B, T]`` float.
        mask: ``[B, T]`` bool or numeric; nonzero = valid.
        gamma: discount in [0, 1].
        last_value: optional ``[B]`` float bootstrap value.

    Returns:
        ``[B, T]`` fp32 (fp64 for fp64 rewards), 0 at masked positions; detached.
    """
    check_tensor("rewards", rewards, FLOAT_DTYPES)
    _check_2d("rewards", rewards)
    _check_mask(mask, "rewards", rewards)
    _check_last_value(last_value, rewards)
    gamma = check_unit_interval("gamma", gamma)

    if not use_triton(rewards):
        with torch.no_grad():
            return reference.discounted_returns(rewards, mask, gamma, last_value)
    _, ret = kernel.gae_forward(
        rewards.detach().contiguous(),
        None,
        mask.contiguous(),
        None if last_value is None else last_value.detach().contiguous(),
        gamma,
        1.0,
        store_advantages=False,
    )
    return ret


# ----------------------------------------------------------------- group advantages


def group_advantages(
    scores: torch.Tensor, group_size: int, *, scale: str | None = "std", eps: float = 1e-6
) -> torch.Tensor:
    """Critic-free (GRPO) advantages: scores normalised within groups of one prompt.

    Groups are `group_size` consecutive entries. scale="std":
    A_i = (s_i - mean_g) / (std_g + eps), with the unbiased (n - 1) std as ``torch.std``
    (what GRPO implementations use); a group of one has std 0 and advantage 0 (torch.std
    would give NaN). scale=None: A_i = s_i - mean_g (Dr. GRPO). One kernel launch.

    Args:
        scores: ``[B]`` float (bf16, fp16, fp32, fp64), B a multiple of `group_size`.
        group_size: samples per prompt, an int >= 1 dividing B.
        scale: "std" or None.
        eps: added to the std, > 0 (checked even with scale=None).

    Returns:
        ``[B]`` fp32 (fp64 for fp64 scores), detached. A group of equal scores gives
        exactly 0 (not a rounded mean's residue over a std as small). A NaN in a group
        gives NaN for that group only. Finite for any finite scores whose group sums
        and differences stay within fp32 (the sum of squared deviations, which overflows
        fp32 past ~1e19, is never formed).
    """
    check_tensor("scores", scores, FLOAT_DTYPES)
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape [B], got {tuple(scores.shape)}")
    group_size = check_int("group_size", group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"group_size must divide the number of scores: scores.shape[0] = "
            f"{scores.shape[0]} is not a multiple of group_size = {group_size}"
        )
    if scale not in ("std", None):
        raise ValueError(f'scale must be "std" or None, got {scale!r}')
    eps = check_positive("eps", eps)

    if not use_triton(scores):
        with torch.no_grad():
            return reference.group_advantages(scores, group_size, scale=scale, eps=eps)
    return kernel.group_advantages_forward(
        scores.detach().contiguous(), group_size, scale == "std", eps
    )


# ----------------------------------------------------------------- masked mean / whiten


class MaskedMeanFunction(torch.autograd.Function):
    """Autograd wrapper of the masked-statistics kernels. Inputs validated by `masked_mean`."""

    @staticmethod
    def forward(ctx, x, mask, dim):
        if dim is None:
            rows_x, rows_m = x.reshape(1, -1), mask.reshape(1, -1)
            out_shape: tuple[int, ...] = ()
        else:
            rows_x, rows_m = x.movedim(dim, -1), mask.movedim(dim, -1)
            out_shape = tuple(rows_x.shape[:-1])
            n_rows = math.prod(out_shape)
            rows_x = rows_x.reshape(n_rows, x.shape[dim])
            rows_m = rows_m.reshape(n_rows, x.shape[dim])
        rows_x, rows_m = rows_x.contiguous(), rows_m.contiguous()
        count, mean, _ = kernel.masked_row_stats(rows_x, rows_m, with_std=False)
        ctx.save_for_backward(rows_m, count)
        ctx.dim = dim
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        return mean.view(out_shape)

    @staticmethod
    @differentiable_once
    def backward(ctx, grad):
        rows_m, count = ctx.saved_tensors
        dx = kernel.masked_mean_backward(grad.reshape(-1).contiguous(), rows_m, count, ctx.x_dtype)
        if ctx.dim is None:
            return dx.view(ctx.x_shape), None, None
        moved = list(ctx.x_shape)
        moved.append(moved.pop(ctx.dim))
        return dx.view(moved).movedim(-1, ctx.dim), None, None


def masked_mean(
    x: torch.Tensor,
    mask: torch.Tensor,
    dim: int | None = None,
    *,
    check_mask: bool | None = None,
) -> torch.Tensor:
    """Mean of the valid entries of `x`: over the whole tensor, or along `dim`. Fused.

    One read of x and mask (per-block count / mean, merged in a second tiny launch);
    differentiable w.r.t. `x` (gradient g / n on valid entries, 0 elsewhere, in x's dtype).

    Args:
        x: float tensor of any shape (bf16, fp16, fp32, fp64).
        mask: same shape, bool or numeric; nonzero = valid. Masked entries of x are never
            read into the result (a NaN there does not leak, nor into the gradient).
        dim: None (all valid entries of x) or the dim to reduce (removed from the shape).
        check_mask: with dim=None, raise ValueError if no entry is valid. Default: on for
            CPU tensors, off for CUDA ones (needs a device sync); unchecked, the result is
            NaN. Along a `dim`, a slice with no valid entry is always NaN.

    Returns:
        fp32 (fp64 for fp64 x): a 0-d tensor (dim=None) or x's shape without `dim`.
    """
    check_tensor("x", x, FLOAT_DTYPES)
    _check_mask(mask, "x", x)
    check_mask = check_bool("check_mask", check_mask, allow_none=True)
    if dim is not None:
        dim = check_int("dim", dim)
        if x.dim() == 0 or not -x.dim() <= dim < x.dim():
            raise ValueError(
                f"dim must be None or in [{-x.dim()}, {x.dim()}) for x of shape "
                f"{tuple(x.shape)}, got {dim}"
            )
        dim %= x.dim()
    elif check_mask is not False:
        _check_some_valid(mask, check_mask)

    if not use_triton(x):
        return reference.masked_mean(x, mask, dim)
    return MaskedMeanFunction.apply(x, mask, dim)


class MaskedWhitenFunction(torch.autograd.Function):
    """Autograd wrapper of the whitening kernels. Inputs validated by `masked_whiten`."""

    @staticmethod
    def forward(ctx, x, mask, shift_mean, eps):
        flat_x = x.reshape(-1).contiguous()
        flat_m = mask.reshape(-1).contiguous()
        stats = kernel.masked_row_stats(flat_x.view(1, -1), flat_m.view(1, -1), with_std=True)
        out = kernel.masked_whiten_forward(flat_x, flat_m, stats, shift_mean, eps)
        ctx.save_for_backward(flat_x, flat_m, *stats)
        ctx.shift_mean = shift_mean
        ctx.eps = eps
        return out.view(x.shape)

    @staticmethod
    @differentiable_once
    def backward(ctx, grad):
        flat_x, flat_m, *stats = ctx.saved_tensors
        dx = kernel.masked_whiten_backward(
            grad.reshape(-1).contiguous(), flat_x, flat_m, tuple(stats), ctx.shift_mean, ctx.eps
        )
        return dx.view(grad.shape), None, None, None


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    check_mask: bool | None = None,
) -> torch.Tensor:
    """Whiten the valid entries of `x` with their mean and std over the whole tensor. Fused.

    y = (x - mean) / sqrt(var + eps), mean and var over all valid entries, var unbiased
    (n - 1), as TRL's ``masked_whiten``; one valid entry has var 0 (TRL raises). With
    shift_mean=False the mean is added back (rescale only). Statistics in one read of the
    data (per-block count / mean / M2, Chan-merged), then one elementwise pass.
    Differentiable w.r.t. `x` through the mean and the std.

    Args:
        x: float tensor of any shape (bf16, fp16, fp32, fp64).
        mask: same shape, bool or numeric; nonzero = valid.
        shift_mean: False adds the mean back after scaling.
        eps: > 0, added to the variance.
        check_mask: raise ValueError if no entry is valid. Default: on for CPU tensors, off
            for CUDA ones (needs a device sync); unchecked, the output is all zeros.

    Returns:
        x's shape, fp32 (fp64 for fp64 x); exactly 0 at masked positions, and at every
        valid one when the valid entries are all equal (x itself with shift_mean=False).
        Finite for any finite x whose sums and differences stay within fp32 (the sum of
        squared deviations, which overflows fp32 past ~1e19, is never formed).
    """
    check_tensor("x", x, FLOAT_DTYPES)
    _check_mask(mask, "x", x)
    shift_mean = check_bool("shift_mean", shift_mean)
    check_mask = check_bool("check_mask", check_mask, allow_none=True)
    eps = check_positive("eps", eps)
    if check_mask is not False:
        _check_some_valid(mask, check_mask)

    if not use_triton(x):
        return reference.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    return MaskedWhitenFunction.apply(x, mask, shift_mean, eps)
