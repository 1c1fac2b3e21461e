"""rlhf-fast: fused Triton kernels for RLHF training (PPO, GRPO, DPO)."""

from rlhf_fast.losses import DPOLoss, PPOLoss
from rlhf_fast.ops.dpo import dpo_loss
from rlhf_fast.ops.gae import (
    discounted_returns,
    gae,
    group_advantages,
    masked_mean,
    masked_whiten,
)
from rlhf_fast.ops.linear_logprobs import linear_dpo_loss, linear_logprobs, linear_ppo_loss
from rlhf_fast.ops.logprobs import logprobs
from rlhf_fast.ops.ppo import ppo_loss
from rlhf_fast.ops.sequence_logps import sequence_logps
from rlhf_fast.reference import DPOLossOutput, PPOLossOutput

__all__ = [
    "gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten",
    "logprobs", "ppo_loss", "PPOLossOutput", "PPOLoss", "sequence_logps", "dpo_loss",
    "DPOLossOutput", "DPOLoss", "linear_logprobs", "linear_dpo_loss",
    "linear_ppo_loss"]
__version__ = "0.1.0"
