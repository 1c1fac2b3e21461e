"""rlhf-fast: fused Triton kernels for RLHF training (PPO, GRPO, DPO)."""

from rlhf_fast.ops.logprobs import logprobs

__all__ = ["logprobs"]
__version__ = "0.1.0"
