"""rlhf-fast: fused Triton kernels for RLHF training (PPO, GRPO, DPO)."""

from rlhf_fast.losses import PPOLoss
from rlhf_fast.ops.gae import (
    discounted_returns,
    gae,
    group_advantages,
    masked_mean,
    masked_whiten,
)
from rlhf_fast.ops.logprobs import logprobs
from rlhf_fast.ops.ppo import ppo_loss
from rlhf_fast.reference import PPOLossOutput

__all__ = [
    "gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten",
    "logprobs", "ppo_loss", "PPOLossOutput", "PPOLoss"]
__version__ = "0.1.0"
