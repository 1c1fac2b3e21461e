"""rlhf-fast: fused Triton kernels for RLHF training (PPO, GRPO, DPO)."""

from rlhf_fast.losses import (
    CPOLoss,
    DPOLoss,
    KTOLoss,
    LinearTokenDivergence,
    ORPOLoss,
    PPOLoss,
    SimPOLoss,
    TokenDivergence,
    TopKTokenDivergence,
)
from rlhf_fast.ops.cpo_loss import cpo_loss
from rlhf_fast.ops.discounted_returns import discounted_returns
from rlhf_fast.ops.dpo_loss import dpo_loss
from rlhf_fast.ops.gae import gae
from rlhf_fast.ops.group_advantages import group_advantages
from rlhf_fast.ops.kto_loss import kto_loss
from rlhf_fast.ops.linear_dpo_loss import linear_dpo_loss
from rlhf_fast.ops.linear_logprobs import linear_logprobs
from rlhf_fast.ops.linear_ppo_loss import linear_ppo_loss
from rlhf_fast.ops.linear_token_divergence import linear_token_divergence
from rlhf_fast.ops.logprobs import logprobs
from rlhf_fast.ops.masked_mean import masked_mean
from rlhf_fast.ops.masked_whiten import masked_whiten
from rlhf_fast.ops.optimal_token_baseline import optimal_token_baseline
from rlhf_fast.ops.orpo_loss import orpo_loss
from rlhf_fast.ops.pair_logps import pair_logps
from rlhf_fast.ops.ppo_loss import ppo_loss
from rlhf_fast.ops.sequence_logps import sequence_logps
from rlhf_fast.ops.simpo_loss import simpo_loss
from rlhf_fast.ops.token_divergence import token_divergence
from rlhf_fast.ops.topk_token_divergence import topk_token_divergence
from rlhf_fast.types import (
    CPOLossOutput,
    DPOLossOutput,
    KTOLossOutput,
    ORPOLossOutput,
    PairLogps,
    PPOLossOutput,
    SimPOLossOutput,
)

__all__ = [
    "gae", "discounted_returns", "group_advantages", "optimal_token_baseline", "masked_mean",
    "masked_whiten",
    "logprobs", "ppo_loss", "PPOLossOutput", "PPOLoss", "sequence_logps", "pair_logps",
    "PairLogps", "dpo_loss",
    "DPOLossOutput", "DPOLoss", "linear_logprobs", "linear_dpo_loss",
    "linear_ppo_loss", "token_divergence", "TokenDivergence", "linear_token_divergence",
    "LinearTokenDivergence", "topk_token_divergence", "TopKTokenDivergence", "simpo_loss",
    "SimPOLossOutput", "SimPOLoss", "cpo_loss", "CPOLossOutput", "CPOLoss", "orpo_loss",
    "ORPOLossOutput", "ORPOLoss", "kto_loss", "KTOLossOutput", "KTOLoss"]
__version__ = "0.1.0"
