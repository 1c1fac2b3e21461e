"""`rlhf_fast.gae`: generalised advantage estimation, one launch for the batch.

Conventions shared by the advantage ops (gae, discounted_returns, group_advantages,
masked_mean, masked_whiten):

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

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import gae as kernel
from rlhf_fast.kernels.common import math_dtype
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    check_2d,
    check_last_value,
    check_mask_like,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import empty_like_absent, kernel_op
from rlhf_fast.options import GAE_OPTIONS


@kernel_op("gae")
def gae_op(
    rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor,
    last_value: torch.Tensor | None, gamma: float, lam: float, store_advantages: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) ``[B, T]``, fp32 (fp64 if rewards or values are fp64); values
    None: all zero (`discounted_returns`); advantages empty unless `store_advantages`.
    Not differentiable: the callers pass detached tensors."""
    adv, ret = kernel.gae_forward(
        rewards.contiguous(), None if values is None else values.contiguous(),
        mask.contiguous(), None if last_value is None else last_value.contiguous(), gamma,
        lam, store_advantages)
    return empty_like_absent(ret) if adv is None else adv, ret


@gae_op.register_fake
def _(rewards, values, mask, last_value, gamma, lam, store_advantages):
    dtype = math_dtype(rewards, *(() if values is None else (values,)))
    return (rewards.new_empty(rewards.shape if store_advantages else (0,), dtype=dtype),
            rewards.new_empty(rewards.shape, dtype=dtype))


@GAE_OPTIONS.keywords
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
    last_value: torch.Tensor | None = None, **options: Any,
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
    check_2d("rewards", rewards)
    check_same_shape("values", values, "rewards", rewards)
    check_same_device("values", values, "rewards", rewards)
    check_mask_like(mask, "rewards", rewards)
    check_last_value(last_value, rewards)
    opt = GAE_OPTIONS.check(options)

    if not use_triton(rewards):
        with torch.no_grad():
            return reference.gae(rewards, values, mask, last_value=last_value, **vars(opt))
    return gae_op(rewards.detach(), values.detach(), mask.detach(),
                  None if last_value is None else last_value.detach(), opt.gamma, opt.lam,
                  True)
