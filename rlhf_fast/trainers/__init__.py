"""Reference PPO / GRPO and DPO trainers on transformers models, using rlhf-fast's ops.

`ppo.py` and `dpo.py` hold the algorithms (`ppo_config.py` PPO's config, `generation.py`
its generation hook), `loop.py` the training loop they share; `config.py`, `models.py`,
`run.py`, `data.py`, `metrics.py`, `checkpoints.py` and `files.py` the plumbing.
"""

from rlhf_fast.trainers.dpo import DPOTrainer
from rlhf_fast.trainers.dpo_config import DPOConfig
from rlhf_fast.trainers.generation import Generation
from rlhf_fast.trainers.models import ValueModel
from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer

__all__ = ["DPOConfig", "DPOTrainer", "Generation", "PPOConfig", "PPOTrainer", "ValueModel"]
