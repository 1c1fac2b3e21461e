"""Every option set of rlhf-fast, declared once.

An option is a keyword setting of a loss (a clip range, a coefficient, a mode): its name,
default, accepted values and one line of documentation are written in this package and
nowhere else. From each `OptionSet` come

* the keyword arguments of the functional ops and of `rlhf_fast.reference` (their
  signatures and the "Options" part of their docstrings, `OptionSet.keywords`), and the
  checks of those arguments, whose errors name the argument (`OptionSet.check`);
* the constructor of the loss modules (`PPOLoss`, `DPOLoss`);
* the fields of the trainer configs and, through them, the CLI flags (`OptionSet.fields`),
  whose errors name the field (``PPOConfig.clip_eps must be ...``); a field may rename
  its option where the config's own field of that name means something else
  (``DPOConfig.cpo_loss_type``: cpo_loss's loss_type).

`option_set` is the mechanism; the sets are declared by family in `policy` (PPO, GAE,
group advantages, optimal token baseline), `preference` (DPO, pair log-probs, SimPO, CPO,
ORPO, KTO) and `tokens` (log-probs, divergences), and all are imported from here.
Adding an option to a loss is one `Option` in its set, plus its math: the reference, the
kernel, and their tests.
"""

from rlhf_fast.options.option_set import (
    Accepts,
    Checked,
    OneOrMore,
    Option,
    OptionSet,
    Reals,
    flag,
    one_of,
    positive_int,
    real,
)
from rlhf_fast.options.policy import (
    GAE_OPTIONS,
    GROUP_ADVANTAGE_OPTIONS,
    OPTIMAL_TOKEN_BASELINE_OPTIONS,
    PPO_OPTIONS,
    rollout_is_bounds,
    rollout_rs_bounds,
)
from rlhf_fast.options.preference import (
    CPO_OPTIONS,
    DPO_OPTIONS,
    DPO_TOKEN_OPTIONS,
    KTO_OPTIONS,
    ORPO_OPTIONS,
    PAIR_LOGPS_OPTIONS,
    SIMPO_OPTIONS,
    dpo_loss_types,
    dpo_terms,
)
from rlhf_fast.options.tokens import (
    DIVERGENCE_OPTIONS,
    LABEL_CHECK,
    LOGPROB_OPTIONS,
    TOKEN_OPTIONS,
    TOPK_DIVERGENCE_OPTIONS,
)

__all__ = [
    "CPO_OPTIONS", "DIVERGENCE_OPTIONS", "DPO_OPTIONS", "DPO_TOKEN_OPTIONS", "GAE_OPTIONS",
    "GROUP_ADVANTAGE_OPTIONS", "KTO_OPTIONS", "LABEL_CHECK", "LOGPROB_OPTIONS",
    "OPTIMAL_TOKEN_BASELINE_OPTIONS", "ORPO_OPTIONS", "PAIR_LOGPS_OPTIONS", "PPO_OPTIONS",
    "SIMPO_OPTIONS", "TOKEN_OPTIONS", "TOPK_DIVERGENCE_OPTIONS", "Accepts", "Checked",
    "OneOrMore", "Option", "OptionSet", "Reals", "dpo_loss_types", "dpo_terms", "flag",
    "one_of", "positive_int", "real", "rollout_is_bounds", "rollout_rs_bounds",
]
