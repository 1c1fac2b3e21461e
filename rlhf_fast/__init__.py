"""rlhf-fast: fused Triton kernels for RLHF training (PPO, GRPO, DPO)."""

from rlhf_fast.ops.logprobs import logprobs
from rlhf_fast.ops.ppo import ppo_loss
from rlhf_fast.reference import PPOLossOutput

__all__ = ["logprobs", "ppo_loss", "PPOLossOutput"]
__version__ = "0.1.0"
