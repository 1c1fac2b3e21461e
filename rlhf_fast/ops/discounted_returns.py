"""`rlhf_fast.discounted_returns`: GAE's scan with lambda 1 and no values, the custom op
``rlhf_fast::gae`` (conventions: `rlhf_fast.ops.gae`)."""

from __future__ import annotations

import torch

from rlhf_fast import reference
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    check_2d,
    check_last_value,
    check_mask_like,
    check_tensor,
    check_unit_interval,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.gae import gae_op


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                       last_value: torch.Tensor | None = None) -> torch.Tensor:
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
    check_2d("rewards", rewards)
    check_mask_like(mask, "rewards", rewards)
    check_last_value(last_value, rewards)
    gamma = check_unit_interval("gamma", gamma)

    if not use_triton(rewards):
        with torch.no_grad():
            return reference.discounted_returns(rewards, mask, gamma, last_value)
    _, ret = gae_op(rewards.detach(), None, mask.detach(),
                    None if last_value is None else last_value.detach(), gamma, 1.0, False)
    return ret
