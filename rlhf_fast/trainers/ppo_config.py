"""`PPOConfig`: everything a PPO / GRPO run of `rlhf_fast.trainers.ppo.PPOTrainer` needs
besides the models and the prompts, with TRL GRPOConfig's names as aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rlhf_fast.options import GAE_OPTIONS, PPO_OPTIONS
from rlhf_fast.options.policy import (
    TRL_IS_MODES,
    rollout_is_from_trl,
    trl_is_clip_max,
    trl_is_clip_min,
)
from rlhf_fast.trainers.config import (
    TRAINER_TRL_NAMES,
    FieldChecker,
    TrainerConfig,
    TrlNames,
    is_finite,
)
from rlhf_fast.types import ADVANTAGE_ESTIMATORS

#: "gae" trains a critic; "gae" and "reinforce_plus_plus" put the KL penalty in the reward,
#: the others (verl's outcome estimators, `group_advantages`, and its optimal token
#: baseline, `optimal_token_baseline`) in the loss.
ESTIMATORS = ("gae", "reinforce_plus_plus", "optimal_token_baseline") + ADVANTAGE_ESTIMATORS
KL_IN_REWARD = ("gae", "reinforce_plus_plus")
#: TRL's scale_rewards, as group_advantages' scale
SCALE_REWARDS = {"group": "std", "batch": "batch", "none": None}
#: TRL GRPOConfig's names of PPOConfig fields: (field, None) for a plain rename, else
#: (name, {TRL value: the fields it sets}) or (name, the type of its value)
#: (`PPOConfig.from_trl_names`). TRL's loss_type
#: grpo averages each sequence's token mean; bnpo and dapo the tokens' (dapo over the
#: global batch: the trainer passes ppo_loss the global counts under DDP, so under DDP
#: bnpo, which TRL normalises per process, is dapo here: every rank's gradient the
#: global batch's); dr_grpo divides the sum by B * max_completion_length.
#: TRL's per_device_train_batch_size (completions per micro-batch) has no counterpart
#: here: rollout_batch_size counts prompts and mini_batch_size a whole optimizer step.
TRL_NAMES: TrlNames = TRAINER_TRL_NAMES | {
    "epsilon": ("clip_eps", None),
    "epsilon_high": ("clip_eps_high", None),
    "beta": ("kl_coef", None),
    "num_generations": ("group_size", None),
    "max_completion_length": ("max_new_tokens", None),
    "num_iterations": ("ppo_epochs", None),
    "loss_type": ("agg", {
        "grpo": dict(agg="seq-mean-token-mean"),
        "bnpo": dict(agg="token-mean"),
        "dr_grpo": dict(agg="seq-mean-token-sum-norm"),
        "dapo": dict(agg="token-mean"),
        "cispo": dict(policy_loss="cispo", agg="token-mean"),
        "sapo": dict(policy_loss="sapo", agg="seq-mean-token-mean"),
    }),
    "importance_sampling_level": ("policy_loss", {
        "token": dict(policy_loss="vanilla"),
        "sequence": dict(policy_loss="gspo"),
        "sequence_token": dict(policy_loss="gspo_token"),
    }),
    "sapo_temperature_pos": ("tau_pos", None),
    "sapo_temperature_neg": ("tau_neg", None),
    # TRL's importance sampling of vLLM's log-probs, together (`rollout_is_from_trl`):
    # a bool, a mode, and two bounds (their flags' types)
    "vllm_importance_sampling_correction": ("rollout_is", bool),
    "vllm_importance_sampling_mode": ("rollout_is", {
        mode: dict(rollout_is=level) for mode, level in TRL_IS_MODES.items()}),
    "vllm_importance_sampling_clip_max": ("rollout_is_threshold", trl_is_clip_max),
    "vllm_importance_sampling_clip_min": ("rollout_is_threshold", trl_is_clip_min),
}
TRL_IMPORTANCE_SAMPLING = tuple(name for name in TRL_NAMES if name.startswith("vllm_"))


#: The options of ppo_loss the trainer sets itself: max_len is max_new_tokens, and the
#: global counts come from every rank (`rlhf_fast.trainers.rollout.global_counts`).
TRAINER_SET = ("max_len", "batch_num_tokens", "global_batch_size", "dp_size")


@dataclass
@PPO_OPTIONS.fields(exclude=TRAINER_SET, defaults={"kl_coef": 0.05}, after="whiten_advantages")
@GAE_OPTIONS.fields(after="top_p")
class PPOConfig(TrainerConfig):
    """Everything a PPO / GRPO run needs besides the models and the prompts: the fields
    of `TrainerConfig`, then PPO's own, among them every option of `ppo_loss` (but those
    the trainer sets, `TRAINER_SET`) and of `gae`, declared in `rlhf_fast.options`.

    With "gae" the KL to the reference is a per-token reward penalty (kl_coef times the k1
    estimate, whatever kl_estimator) and vf_coef weighs the critic's loss; with "grpo" the
    KL is a term of the loss (kl_estimator) and there is no critic. Sizes are per process:
    under torchrun every process rolls out its own prompts.
    """

    trl_names: ClassVar[TrlNames] = TRL_NAMES  # TRL's names of fields: `from_trl_names`

    output_dir: str = "runs/ppo"
    """Where metrics.jsonl, the plot, checkpoints and the final models go."""
    lr: float = 1e-6
    """Peak AdamW learning rate of the policy (and of the critic, unless value_lr)."""
    logging_steps: int = 1
    """Log every this many iterations: the mean of their metrics (lr: the latest)."""
    advantage_estimator: str = "gae"
    """"gae" (a critic, KL penalty in the reward), "reinforce_plus_plus" (KL penalty in the
    reward, whitened returns) or a critic-free outcome estimator with the KL in the loss:
    "grpo", "rloo", "opo", "grpo_passk", "gpg", "reinforce_plus_plus_baseline", "remax"
    (its baseline: the score of a greedy answer to each prompt), "gdpo" (each reward
    function's scores normalised in their groups, then weighted: reward_weights, and
    whitened), "optimal_token_baseline" (verl's OTB: a baseline per position from the
    group's path variances)."""
    max_steps: int = 100
    """Iterations (rollout, then ppo_epochs of updates)."""
    rollout_batch_size: int = 16
    """Prompts per process per iteration; each is sampled group_size times."""
    group_size: int = 1
    """Answers per prompt (>= 2 for the group estimators: all but gae,
    reinforce_plus_plus and remax)."""
    scale_rewards: str = "group"
    """grpo and grpo_passk: divide by the group's std ("group"), the batch's ("batch") or
    not ("none": Dr. GRPO), TRL's names."""
    mini_batch_size: int = 8
    """Sequences per forward / backward in the update (a micro-batch; an optimizer step
    takes gradient_accumulation_steps of them)."""
    gradient_accumulation_steps: int = 1
    """Minibatches whose gradients add up to one optimizer step (TRL's): each one's loss
    is its share of the accumulated batch's, so k minibatches of b sequences step as one
    of k * b would."""
    eval_do_sample: bool = False
    """Evaluation answers sampled as the rollouts' (temperature, top_p) instead of
    greedy."""
    ppo_epochs: int = 4
    """Passes over each rollout."""
    value_lr: float | None = None
    """Learning rate of the critic; None: lr."""
    max_new_tokens: int = 64
    """Longest answer in tokens; an answer that reaches it without EOS is cut there (see
    missing_eos_penalty)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are taken at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold in (0, 1]."""
    whiten_advantages: bool = True
    """Whiten the gae advantages over the rollout's valid tokens."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of answers that hit max_new_tokens without EOS (from each
    reward source's)."""
    reward_weights: list[float] | None = None
    """TRL's reward_weights: one weight per reward function or model (in the order
    given); the answers' scores are their weighted sum (gdpo: the sum of their normalised
    advantages). None: 1 each."""
    distill_coef: float = 1.0
    """With a teacher (on-policy distillation): the weight of its per-token reward
    log pi_teacher(y_t) - log pi(y_t), the negative reverse KL (k1) of each sampled token:
    in the rewards for gae and reinforce_plus_plus, added to each token's advantage for
    the others."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require = FieldChecker("PPOConfig")
        require("advantage_estimator", self.advantage_estimator in ESTIMATORS,
                f"one of {ESTIMATORS}")
        require.ints(self, ("max_steps", "rollout_batch_size", "group_size", "mini_batch_size",
                            "gradient_accumulation_steps", "ppo_epochs", "max_new_tokens"), 1)
        grouped = self.advantage_estimator not in ("gae", "reinforce_plus_plus", "remax")
        require("group_size", not grouped or self.group_size >= 2,
                f">= 2 for advantage_estimator={self.advantage_estimator!r}")
        require("scale_rewards", self.scale_rewards in SCALE_REWARDS,
                f"one of {tuple(SCALE_REWARDS)}", self.scale_rewards)
        require("scale_rewards", self.advantage_estimator != "gdpo"
                or self.scale_rewards != "batch",
                '"group" or "none" for gdpo (each reward is normalised in its groups)',
                self.scale_rewards)
        self._check_rates()
        PPO_OPTIONS.check_fields(self)
        GAE_OPTIONS.check_fields(self)
        # rollout_is / rollout_rs go with any policy loss: they correct against the log-probs
        # of a generate_fn hook (PPOTrainer raises without one, or at the first rollout
        # whose hook returned none), or, in bypass_mode, against the policy's own.
        require("missing_eos_penalty",
                self.missing_eos_penalty is None or is_finite(self.missing_eos_penalty),
                "a finite float or None", self.missing_eos_penalty)
        require.bools(self, ("whiten_advantages", "eval_do_sample"))
        require("reward_weights", self.reward_weights is None or (
            isinstance(self.reward_weights, (list, tuple)) and len(self.reward_weights) > 0
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) and is_finite(w)
                    for w in self.reward_weights)),
            "a non-empty list of finite floats or None", self.reward_weights)
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]
        require("distill_coef", isinstance(self.distill_coef, (int, float))
                and not isinstance(self.distill_coef, bool) and is_finite(self.distill_coef)
                and self.distill_coef >= 0, "a finite float >= 0", self.distill_coef)
        self.distill_coef = float(self.distill_coef)

    @property
    def optimizer_steps_per_iteration(self) -> int:
        """ppo_epochs x the accumulation groups of one pass over a rollout's minibatches
        (a last incomplete group steps too)."""
        rows = self.rollout_batch_size * self.group_size
        minibatches = -(-rows // self.mini_batch_size)
        return self.ppo_epochs * -(-minibatches // self.gradient_accumulation_steps)

    @classmethod
    def from_trl_names(cls, **given: Any) -> dict[str, Any]:
        """PPOConfig fields from TRL GRPOConfig names (`TRL_NAMES`): epsilon,
        epsilon_high, beta, num_generations, num_iterations, max_completion_length,
        learning_rate, resume_from_checkpoint, loss_type (grpo / bnpo / dr_grpo / dapo: the
        aggregation they mean; cispo, sapo: the policy loss too) and
        importance_sampling_level (token / sequence / sequence_token: vanilla / gspo /
        gspo_token), sapo_temperature_pos / _neg (tau_pos / tau_neg) and
        vllm_importance_sampling_correction / _mode / _clip_max / _clip_min (rollout_is and
        rollout_is_threshold: `rollout_is_from_trl`). TRL's cispo caps the ratio at
        epsilon_high itself, without a lower bound: clip_eps_high = epsilon_high - 1 and
        clip_eps = 0.999 here. Unknown names raise ValueError naming them."""
        sampling = {k: given.pop(k) for k in TRL_IMPORTANCE_SAMPLING if k in given}
        fields = super().from_trl_names(**given)
        if fields.get("policy_loss") == "cispo" and "epsilon_high" in given:
            fields |= dict(clip_eps_high=given["epsilon_high"] - 1, clip_eps=0.999)
        if sampling:
            fields |= rollout_is_from_trl(**sampling)
        return fields

    def _check_rates(self) -> None:
        """Critic and sampling settings (TrainerConfig checks lr and the optimizer's)."""
        require = FieldChecker("PPOConfig")
        require("value_lr", self.value_lr is None
                or (is_finite(self.value_lr) and self.value_lr > 0),
                "a finite float > 0 or None", self.value_lr)
        require("temperature", is_finite(self.temperature) and self.temperature > 0,
                "a finite float > 0", self.temperature)
        require("top_p", 0 < self.top_p <= 1, "in (0, 1]", self.top_p)
