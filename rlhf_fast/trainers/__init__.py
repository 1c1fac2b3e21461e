"""Reference PPO / GRPO and DPO trainers on transformers models, using rlhf-fast's ops."""

from rlhf_fast.trainers.common import ValueModel
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer

__all__ = ["DPOConfig", "DPOTrainer", "PPOConfig", "PPOTrainer", "ValueModel"]
