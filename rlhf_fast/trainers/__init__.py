"""Reference PPO / GRPO and DPO trainers on transformers models, using rlhf-fast's ops.

`ppo.py` and `dpo.py` hold the algorithms (`ppo_config.py` and `dpo_config.py` their
configs; `rollout.py` PPO's sampled and scored answers, `rewards.py` their reward sources,
`generation.py` its generation hook; `pairs.py` DPO's stacked batches), `loop.py` the
training loop they share; `config.py`, `models.py`, `run.py`, `sources.py`, `data.py`,
`metrics.py`, `checkpoints.py`, `model_state.py` and `files.py` the plumbing.
"""

from rlhf_fast.trainers.dpo import DPOTrainer
from rlhf_fast.trainers.dpo_config import DPOConfig
from rlhf_fast.trainers.generation import Generation, vllm_generate_fn
from rlhf_fast.trainers.models import ValueModel
from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer

__all__ = ["DPOConfig", "DPOTrainer", "Generation", "PPOConfig", "PPOTrainer", "ValueModel",
           "vllm_generate_fn"]
