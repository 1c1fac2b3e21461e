"""Plain PyTorch versions of every rlhf-fast op.

This package is the specification: each function here has the same signature and the
same semantics as the public op of the same name, written as plainly as a textbook.
It is the oracle the tests compare the Triton kernels against (in float64), and the
CPU fallback the trainers use when Triton cannot run. Readable first, fast second.
"""

from rlhf_fast.reference.advantages import (
    discounted_returns,
    gae,
    group_advantages,
    masked_mean,
    masked_whiten,
    optimal_token_baseline,
)
from rlhf_fast.reference.distillation import (
    linear_token_divergence,
    token_divergence,
    topk_token_divergence,
)
from rlhf_fast.reference.policy import aggregate, kl_penalty, policy_terms, ppo_loss
from rlhf_fast.reference.policy_masks import (
    ROLLOUT_STATISTICS,
    kl_cov_coefficients,
    policy_weights,
    rollout_correction,
)
from rlhf_fast.reference.preference import (
    EXO_DEFAULT_EPS,
    cpo_loss,
    dpo_loss,
    kto_loss,
    log1mexp,
    log_sigmoid,
    orpo_loss,
    simpo_loss,
)
from rlhf_fast.reference.tokens import (
    fits_dtype,
    ignored_labels,
    linear_logprobs,
    logprobs,
    pair_logps,
    sequence_logps,
)

__all__ = [
    "EXO_DEFAULT_EPS", "ROLLOUT_STATISTICS", "aggregate", "cpo_loss", "discounted_returns",
    "dpo_loss", "fits_dtype", "gae", "group_advantages", "ignored_labels", "kl_cov_coefficients",
    "kl_penalty", "kto_loss", "linear_logprobs", "linear_token_divergence", "log1mexp",
    "log_sigmoid", "logprobs", "masked_mean", "masked_whiten", "optimal_token_baseline",
    "orpo_loss", "pair_logps", "policy_terms", "policy_weights", "ppo_loss", "rollout_correction",
    "sequence_logps", "simpo_loss", "token_divergence", "topk_token_divergence",
]
