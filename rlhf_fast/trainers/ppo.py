"""A reference PPO / GRPO trainer on transformers causal LMs, built on rlhf-fast's ops.

One iteration, top to bottom (`PPOTrainer.iteration`, then `rollout`, `update`):
1. rollout: sample `group_size` answers to each of a batch of prompts with `generate`
   (temperature, top-p, stop at EOS), or with a `generate_fn` hook (another inference
   engine: `rlhf_fast.trainers.generation`); an answer's tokens count up to its first EOS;
2. score each answer: a reward function of the decoded text, or a reward model's score
   at the answer's last token;
3. per-token log-probs of the rollout under the policy and the frozen reference, and the
   critic's values, all without gradients (`logprobs` / `linear_logprobs`);
4. advantages. "gae": reward r_t = -kl_coef * (log pi - log pi_ref) per token, plus the
   score on the last token; `gae` with the critic's values; `masked_whiten`.
   "grpo" and verl's other outcome estimators (rloo, opo, grpo_passk, gpg,
   reinforce_plus_plus_baseline, remax: `group_advantages`): no critic; each score
   against its prompt's group, the same for every token of an answer, and the KL to the
   reference in the loss instead. "optimal_token_baseline" (verl's OTB): no critic, the
   score on the last token against a per-position baseline of the group, weighted by the
   answers' path variance (1 - 2 pi + sum pi^2, from the rollout's `return_sum_p2`), the
   KL in the loss. "reinforce_plus_plus": no critic, the KL penalty in the reward as for
   gae, `discounted_returns` then `masked_whiten`;
5. `ppo_epochs` passes over the rollout in minibatches: recompute log-probs, entropy and
   values with gradients, `ppo_loss` (clipped ratio, KL, entropy bonus, clipped value
   loss), backward, clip, one AdamW step per minibatch.

`rlhf_fast.trainers.loop` runs the iterations: logging, checkpoints, the final models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from rlhf_fast import (
    discounted_returns,
    gae,
    group_advantages,
    masked_whiten,
    optimal_token_baseline,
    ppo_loss,
)
from rlhf_fast.options import GAE_OPTIONS, PPO_OPTIONS
from rlhf_fast.trainers.checkpoints import Export
from rlhf_fast.trainers.data import batches, example_indices, tokenized_prompts
from rlhf_fast.trainers.files import save_pretrained_atomic
from rlhf_fast.trainers.generation import (
    GenerateFn,
    check_generation,
    completion_tensors,
    generation_seed,
    hook_sampling,
)
from rlhf_fast.trainers.loop import Loop, start_run
from rlhf_fast.trainers.metrics import host_floats
from rlhf_fast.trainers.model_state import model_identity, strip_prefix
from rlhf_fast.trainers.models import (
    ActorCritic,
    TokenLogprobs,
    ValueModel,
    as_value_module,
    frozen,
    only_generation_config,
    prepare_for_training,
    reference_identity,
    reference_logprobs,
    with_adapter,
)
from rlhf_fast.trainers.ppo_config import KL_IN_REWARD, SCALE_REWARDS, PPOConfig
from rlhf_fast.trainers.rewards import (
    Reward,
    RewardFn,
    call_reward_function,
    check_finite_scores,
    function_name,
)
from rlhf_fast.trainers.run import unwrap, wrap_ddp

if TYPE_CHECKING:
    from transformers import GenerationConfig

#: ppo_loss's outputs the update logs; the loss terms among them add up over the
#: minibatches of an optimizer step (`ADDITIVE_METRICS`), the others are their means
LOGGED_LOSS_OUTPUTS = ("loss", "policy_loss", "value_loss", "entropy", "clipfrac",
                       "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl",
                       "ratio_mean")
#: ppo_loss's statistics of the rollout correction (the mismatch between the rollout
#: engine's log-probs and the policy's), logged when it has them: rollout_is_max is the
#: max over the minibatches, the others their means
ROLLOUT_OUTPUTS = ("rollout_is_mean", "rollout_is_max", "rollout_rs_masked_fraction",
                   "rollout_kl", "rollout_k3_kl")
ADDITIVE_METRICS = ("loss", "policy_loss", "value_loss", "entropy")
MAX_METRICS = ("rollout_is_max",)
PPO_PLOT_KEYS = ["reward", "kl", "entropy", "clipfrac", "approx_kl", "policy_loss",
                 "value_loss", "response_length"]


@dataclass
class Rollout:
    """A batch of sampled answers, B = prompts x group_size rows, R answer positions.

    sequences, attention_mask: [B, P + R] (prompts left-padded to P, answers
    right-padded after their first EOS); mask: [B, R] float, 1 on answer tokens;
    old_logp, ref_logp, values: [B, R] fp32 (values None without a critic); scores: [B],
    the weighted sum of reward_columns [B, K] (one per reward source);
    advantages, returns: [B, R] (returns None without a critic); teacher_logp: [B, R],
    the teacher's log-probs of the sampled tokens (None without a teacher); rollout_logp:
    [B, R] fp32, the generation hook's log-probs of the sampled tokens, 0 off the answers
    (None without them).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    values: torch.Tensor | None
    scores: torch.Tensor
    reward_columns: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None
    teacher_logp: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None


class Answers(NamedTuple):
    """Scored answers (`PPOTrainer._answer_and_score`): sequences, attention_mask
    [B, P + R] (prompts left-padded, answers right-padded after their first EOS); scores
    [B, K] fp32, one column per reward source; rollout_logp [B, R] fp32, the generation
    hook's log-probs of the answer tokens (0 on the padding), or None."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    scores: torch.Tensor
    rollout_logp: torch.Tensor | None


def corrects_rollouts(config: PPOConfig) -> bool:
    """Whether the config asks for verl's rollout correction (rollout_is or rollout_rs)."""
    return config.rollout_is is not None or config.rollout_rs is not None


def passes_rollout_logp(config: PPOConfig) -> bool:
    """Whether ppo_loss takes the hook's log-probs as rollout_logp: always but in
    bypass_mode, which corrects against the policy's own log-probs (and refuses them)."""
    return config.policy_loss != "bypass_mode"


def check_rollout_logp(config: PPOConfig, rollout_logp: torch.Tensor | None,
                       generate_fn: GenerateFn | None) -> None:
    """ValueError when the config's rollout correction has no rollout log-probs to
    correct against: no generate_fn, or one that returned logprobs=None."""
    if not corrects_rollouts(config) or not passes_rollout_logp(config) \
            or rollout_logp is not None:
        return
    option = f"rollout_is={config.rollout_is!r}" if config.rollout_is is not None else \
        f"rollout_rs={config.rollout_rs!r}"
    source = "no generate_fn was given (generate's answers are the policy's own)" \
        if generate_fn is None else f"generate_fn {function_name(generate_fn)} returned " \
        f"logprobs=None"
    raise ValueError(f"PPOConfig.{option} needs the rollout engine's log-probs, but "
                     f"{source}: pass a generate_fn returning Generation(completion_ids, "
                     f"logprobs), or use policy_loss='bypass_mode', or set rollout_is and "
                     f"rollout_rs to None")


def combine_metric(key: str, total: torch.Tensor | None, value: torch.Tensor
                   ) -> torch.Tensor:
    """A metric's running total over minibatches: the max for `MAX_METRICS`, else the sum."""
    if total is None:
        return value
    return torch.maximum(total, value) if key in MAX_METRICS else total + value


def check_same_vocabulary(teacher: nn.Module, policy: nn.Module) -> None:
    """The teacher scores the policy's tokens: its lm_head must have the policy's rows."""
    rows = [model.get_output_embeddings().weight.shape[0] for model in (teacher, policy)]
    if rows[0] != rows[1]:
        raise ValueError(f"teacher must share the policy's vocabulary: its lm_head has "
                         f"{rows[0]} rows, the policy's {rows[1]}")


class PPOTrainer:
    """PPO (with a critic and GAE) or GRPO (critic-free) on a causal LM.

    Args:
        policy: a transformers causal LM, trained in place.
        ref_policy: the frozen reference; None takes a frozen copy of `policy` as it is now.
        value_model: the critic for "gae": a `ValueModel` (backbone + scalar head) or an
            ``AutoModelForSequenceClassification`` with num_labels=1. None with "gae":
            `ValueModel.from_causal_lm(policy)` (a copy of the policy's backbone and a
            zero head). Must be None for the critic-free estimators (all but "gae").
        reward_fn_or_model: ``f(prompts: list[str], answers: list[str]) -> [B] scores``
            on the decoded text, or a reward model (a sequence classifier with one label,
            sharing the policy's tokenizer) scored at each answer's last token, or a list
            of them (TRL's reward_funcs): their scores summed with config.reward_weights,
            or for "gdpo" each normalised in its groups first. A NaN or infinite score
            raises ValueError.
        tokenizer: the policy's tokenizer (needs eos_token_id; pad defaults to EOS).
        prompts: prompt strings or lists of messages (rendered with the tokenizer's chat
            template and the generation prompt), as strings, {"prompt"} records, a JSONL /
            JSON / parquet file of records, a text file of one prompt per line, a
            ``datasets.Dataset`` or ``DatasetDict`` (config.data_split), a dataset folder or
            a hub dataset id.
        config: a `PPOConfig`.
        teacher: a causal LM sharing the policy's vocabulary, for on-policy distillation
            (Agarwal et al. 2024; Thinking Machines' on-policy distillation): each sampled
            token's reward gains config.distill_coef * (log pi_teacher - log pi), the
            negative reverse KL estimate, through the fused log-prob ops. With a teacher,
            reward_fn_or_model may be None (distillation alone).
        eval_prompts: prompts as `prompts` takes them, answered (greedily, or sampled
            with eval_do_sample) at eval_steps and at the end: their mean weighted score
            is logged as eval/reward. The evaluation draws from forked random streams,
            so the training's results are the same with or without it.
        peft_config: a ``peft.LoraConfig``: train an adapter on `policy` (as
            config.use_peft does with the lora_* fields); without a ref_policy the
            reference is the policy with its adapter disabled, not a copy. final/ then
            holds the adapter (peft's save_pretrained).
        generate_fn: None (the policy's ``generate``), or a hook that samples the answers
            with another engine (vLLM, SGLang, a server holding the policy's current
            weights): ``generate_fn(prompt_ids: list[list[int]], *, max_new_tokens: int,
            temperature: float, top_p: float, top_k: int, seed: int) -> Generation``
            (`rlhf_fast.trainers.generation`), one completion per prompt row (a prompt
            sampled group_size times comes group_size times, unpadded), each ending at
            the tokenizer's EOS or cut at max_new_tokens; temperature 0 asks for greedy
            answers (remax's baselines, evaluation), top_k 0 for no top-k. Its optional
            logprobs (the engine's log-prob of each sampled token) reach ppo_loss as
            rollout_logp, for the rollout correction (config.rollout_is, rollout_rs) and
            the logged mismatch statistics (rollout_kl, ...). Bad output raises
            ValueError naming generate_fn.
    """

    def __init__(self, policy: nn.Module, ref_policy: nn.Module | None = None,
                 value_model: nn.Module | None = None,
                 reward_fn_or_model: RewardFn | nn.Module | Sequence[RewardFn | nn.Module]
                 | None = None, *,
                 tokenizer: Any, prompts: Any, config: PPOConfig | None = None,
                 teacher: nn.Module | None = None, eval_prompts: Any = None,
                 peft_config: Any = None, generate_fn: GenerateFn | None = None):
        self.config = config = config or PPOConfig()
        if generate_fn is not None and not callable(generate_fn):
            raise ValueError(f"generate_fn must be None or a callable returning a "
                             f"Generation, got {type(generate_fn).__name__}")
        if generate_fn is None:  # no rollout log-probs to correct against: say so now
            check_rollout_logp(config, None, None)
        self.generate_fn = generate_fn
        if reward_fn_or_model is None and teacher is None:
            raise ValueError("reward_fn_or_model is required (or a teacher): a function of "
                             "(prompts, answers) or a reward model")
        if teacher is not None:
            check_same_vocabulary(teacher, policy)
        critic_free = config.advantage_estimator != "gae"
        if critic_free and value_model is not None:
            raise ValueError(f"value_model must be None for advantage_estimator="
                             f"{config.advantage_estimator!r} (only gae has a critic)")
        self.run = start_run(config)
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer needs an eos_token_id (answers stop at it)")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else self.eos_id
        # conversations are rendered with the chat template: reward functions read that text
        self.records, self.prompt_ids = tokenized_prompts(
            prompts, tokenizer, max_prompt_length=config.max_prompt_length, name="prompts",
            split=config.data_split)
        self.prompts = [record["prompt_text"] for record in self.records]
        self.eval_records, self.eval_prompt_ids = (None, None) if eval_prompts is None else \
            tokenized_prompts(eval_prompts, tokenizer, max_prompt_length=config.max_prompt_length,
                              name="eval_prompts", split=config.data_split)
        if len(self.prompts) < config.rollout_batch_size * self.run.world:
            raise ValueError(f"prompts has {len(self.prompts)} entries, fewer than one "
                             f"rollout (rollout_batch_size x processes)")

        self.fused_linear = self.run.fused_linear(config.use_fused_linear)
        device = self.run.device
        critic = None
        if not critic_free:  # (a default critic copies the backbone without an adapter)
            value_model = value_model or ValueModel.from_causal_lm(policy)
            critic = as_value_module(value_model.to(device))
        self.value_model = value_model
        self.policy = policy = with_adapter(policy, config, peft_config).to(device)
        self.reference = reference_logprobs(policy, ref_policy, fused_linear=self.fused_linear,
                                            temperature=config.temperature).to(device)
        self.teacher = None if teacher is None else TokenLogprobs(
            frozen(teacher).to(device), fused_linear=self.fused_linear,
            temperature=config.temperature)
        sources = list(reward_fn_or_model) if isinstance(reward_fn_or_model, (list, tuple)) \
            else [] if reward_fn_or_model is None else [reward_fn_or_model]
        weights = config.reward_weights or [1.0] * len(sources)
        if len(weights) != len(sources):
            raise ValueError(f"PPOConfig.reward_weights must have one weight per reward "
                             f"function or model ({len(sources)}), got {len(weights)}")
        # (distillation alone scores every answer 0: one column, `_score`)
        self.reward_weights = torch.tensor(weights or [1.0], dtype=torch.float32,
                                           device=device)
        self.rewards = [Reward.of(source, device) for source in sources]
        # checkpoints hold the policy and critic, not these: they record which they were
        frozen_models = {"reference": reference_identity(self.reference)} | {
            "reward model" + (f" {i}" if len(sources) > 1 else ""): model_identity(r.model)
            for i, r in enumerate(self.rewards)} | ({} if self.teacher is None else {
                "teacher": model_identity(self.teacher.model)})
        for trained in (policy, value_model):
            if trained is not None:
                prepare_for_training(trained, config)
        actor = TokenLogprobs(policy, fused_linear=self.fused_linear,
                              temperature=config.temperature)
        self.actor_critic = wrap_ddp(ActorCritic(actor, critic), self.run)
        self._loss = config.compiled(self._minibatch_loss)
        groups = [{"params": [p for p in policy.parameters() if p.requires_grad]}]
        if critic is not None:
            groups.append({"params": [p for p in critic.parameters() if p.requires_grad],
                           "lr": config.value_lr or config.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr,
                                           weight_decay=config.weight_decay)
        # update() averages its metrics over the processes: the window holds their means
        # checkpoints hold the policy as a transformers folder, the critic in value_model/
        exports = [Export("", "actor.model.", policy, tokenizer)]
        if value_model is not None:
            exports.append(Export("value_model", self._critic_prefix(), value_model))
        self.loop = Loop(config, self.run, self.optimizer, unwrap(self.actor_critic),
                         exports, frozen_models,
                         training_steps=config.max_steps * config.optimizer_steps_per_iteration,
                         name="PPO",
                         title=f"PPO ({config.advantage_estimator})", plot_keys=PPO_PLOT_KEYS,
                         rank_means=False)

    @property
    def step(self) -> int:
        """Iterations done."""
        return self.loop.step

    # --- the algorithm ---------------------------------------------------------------

    def train(self) -> list[dict[str, float]]:
        """Run to max_steps iterations (from the checkpoint's when resuming); returns the
        logged metrics of this output_dir."""
        return self.loop.train(self.config.max_steps, self.iteration,
                               save_final=self._save_final,
                               evaluate=None if self.eval_records is None else self.evaluate,
                               eval_steps=self.config.eval_steps)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """eval/reward: the mean weighted score of answers to eval_prompts (each process
        answers its share), greedy unless eval_do_sample. Under `torch.random.fork_rng`,
        seeded with config.seed: the training's random streams are left as they were, and
        every evaluation samples alike."""
        if self.eval_records is None:
            raise ValueError("evaluate() needs eval_prompts")
        config, run = self.config, self.run
        generation_config = self.generation_config() if config.eval_do_sample else \
            self.greedy_generation_config()
        mine = list(range(run.rank, len(self.eval_records), run.world))
        total = torch.zeros(2, dtype=torch.float64, device=run.device)  # score sum, count
        devices = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            for rows in batches(mine, config.rollout_batch_size):
                prompt_ids, prompt_mask = self._left_pad([self.eval_prompt_ids[r] for r in rows])
                columns = self._answer_and_score(
                    prompt_ids, prompt_mask, [self.eval_records[r] for r in rows],
                    generation_config, seed=config.seed).scores
                total += torch.stack([(columns @ self.reward_weights).sum().double(),
                                      torch.tensor(len(rows), dtype=torch.float64,
                                                   device=run.device)])
        total = run.sum_over_ranks_tensor(total) if run.world > 1 else total
        return {"eval/reward": (total[0] / total[1].clamp(min=1)).item()}

    def iteration(self) -> tuple[float, float]:
        """One iteration: a rollout, then ppo_epochs of updates on it; returns the lr of
        the last update and the rollout's tokens."""
        rollout = self.rollout(self.loop.step)
        metrics = self.update(rollout)
        lr = metrics.pop("lr")
        self.loop.window.add(metrics)
        self.loop.step += 1
        return lr, float(rollout.attention_mask.sum())

    @torch.no_grad()
    def rollout(self, iteration: int) -> Rollout:
        """Sample, score and evaluate the answers of iteration `iteration`'s prompts."""
        config = self.config
        rows = example_indices(len(self.prompts), config.rollout_batch_size, self.run,
                               config.seed, iteration)
        rows = [row for row in rows for _ in range(config.group_size)]
        prompt_ids, prompt_mask = self._left_pad([self.prompt_ids[r] for r in rows])
        records = [self.records[r] for r in rows]
        seed = generation_seed(config.seed, iteration, self.run.rank)
        answers = self._answer_and_score(prompt_ids, prompt_mask, records,
                                         self.generation_config(), seed=seed)
        check_rollout_logp(config, answers.rollout_logp, self.generate_fn)
        baselines = None
        if config.advantage_estimator == "remax":  # a greedy answer per prompt
            group = config.group_size
            greedy_scores = self._answer_and_score(
                prompt_ids[::group], prompt_mask[::group], records[::group],
                self.greedy_generation_config(), seed=seed).scores
            baselines = (greedy_scores @ self.reward_weights).repeat_interleave(group)
        return self.evaluate_answers(answers.sequences, answers.attention_mask,
                                     prompt_ids.shape[1], answers.scores, baselines,
                                     rollout_logp=answers.rollout_logp)

    def _generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  generation_config: GenerationConfig, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(answers [B, R] int64, rollout_logp [B, R] fp32 or None) to the left-padded
        prompts [B, P]: the policy's ``generate`` (its sequences past the prompts; no
        log-probs), or the generate_fn hook's completions, right-padded (with its
        log-probs, if it returned them, `check_generation`). generate's rows run on past
        an answer's first EOS (its padding): the caller cuts there."""
        if self.generate_fn is None:
            self.policy.eval()
            with self.run.autocast(), only_generation_config(self.policy, generation_config):
                sequences = self.policy.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask,
                    generation_config=generation_config)
            self.policy.train()
            return sequences[:, prompt_ids.shape[1]:], None
        prompts = [row[keep.bool()].tolist() for row, keep in zip(prompt_ids, prompt_mask)]
        sampling = hook_sampling(generation_config)
        self.policy.eval()  # (for a hook that samples with the policy itself)
        try:
            generation = self.generate_fn(prompts, seed=seed, **sampling)
        finally:
            self.policy.train()
        generation = check_generation(
            generation, rows=len(prompts), eos_id=self.eos_id,
            vocab_size=self.policy.get_output_embeddings().weight.shape[0],
            max_new_tokens=sampling["max_new_tokens"])
        return completion_tensors(generation, self.pad_id, prompt_ids.device)

    def _answer_and_score(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          records: list[dict[str, Any]], generation_config: GenerationConfig,
                          seed: int) -> Answers:
        """Generate an answer to each left-padded prompt (`_generate`; `seed` for a
        generate_fn), cut after its first EOS, and score it: `Answers`, the scores with
        missing_eos_penalty taken off each column."""
        answers, rollout_logp = self._generate(prompt_ids, prompt_mask, generation_config,
                                               seed)
        is_eos = answers == self.eos_id
        mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # through the first EOS
        answers = answers.masked_fill(~mask, self.pad_id)
        sequences = torch.cat([prompt_ids, answers], 1)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)
        scores = self._score(records, answers, mask, sequences, attention_mask)
        if self.config.missing_eos_penalty is not None:
            scores = scores - self.config.missing_eos_penalty * (~is_eos.any(1)).float()[:, None]
        if rollout_logp is not None:
            rollout_logp = rollout_logp * mask
        return Answers(sequences, attention_mask, scores, rollout_logp)

    def greedy_generation_config(self) -> GenerationConfig:
        """Greedy answers (remax's baselines, evaluation), stopping at EOS."""
        from transformers import GenerationConfig

        return GenerationConfig(do_sample=False, max_new_tokens=self.config.max_new_tokens,
                                eos_token_id=self.eos_id, pad_token_id=self.pad_id)

    def generation_config(self) -> GenerationConfig:
        """Sampling as the config says and nothing else: temperature, top-p, no top-k, stop
        at EOS. old_logp is the policy's log-prob at `temperature`, so the answers must be
        drawn from that distribution, with no repetition penalty, banned words, minimum
        length, ... (what a model's own generation_config may ask for)."""
        from transformers import GenerationConfig

        config = self.config
        return GenerationConfig(do_sample=True, temperature=config.temperature,
                                top_p=config.top_p, top_k=0,
                                max_new_tokens=config.max_new_tokens,
                                eos_token_id=self.eos_id, pad_token_id=self.pad_id)

    @torch.no_grad()
    def evaluate_answers(self, sequences: torch.Tensor, attention_mask: torch.Tensor,
                         width: int, scores: torch.Tensor,
                         baselines: torch.Tensor | None = None,
                         rollout_logp: torch.Tensor | None = None) -> Rollout:
        """Log-probs, values and advantages of scored answers: the rest of a rollout.

        sequences, attention_mask: [B, width + R], prompts left-padded to `width`, answers
        right-padded; scores: [B, K] fp32, one column per reward source (or [B], one
        source); baselines: [B], remax's greedy scores; rollout_logp: [B, R] fp32, the
        generation hook's log-probs of the answers (kept in the Rollout as they are).
        """
        config = self.config
        columns = scores if scores.dim() == 2 else scores[:, None]
        scores = columns @ self.reward_weights  # one score per answer
        mask = attention_mask[:, width:].float()
        estimator = config.advantage_estimator
        actor_critic = unwrap(self.actor_critic)
        actor_critic.eval()  # the rollout's statistics without dropout noise
        with self.run.autocast():
            old_logp, _, values, *log_sum_p2 = actor_critic(
                sequences, attention_mask, width,
                return_sum_p2=estimator == "optimal_token_baseline")
            ref_logp = self.reference(sequences, attention_mask)[:, width - 1:]
            teacher_logp = None if self.teacher is None else \
                self.teacher(sequences, attention_mask)[:, width - 1:]
        actor_critic.train()
        # on-policy distillation: each token's reward log pi_teacher(y_t) - log pi(y_t)
        distill = 0.0 if teacher_logp is None else \
            config.distill_coef * (teacher_logp - old_logp) * mask

        returns = None
        # token rewards: each answer's score on its last token
        rewards = torch.zeros_like(old_logp)
        rewards[torch.arange(len(scores), device=scores.device), mask.sum(1).long() - 1] = scores
        if estimator == "optimal_token_baseline":
            advantages, _ = optimal_token_baseline(rewards, mask, old_logp, *log_sum_p2,
                                                   config.group_size)
        elif estimator == "gdpo":  # each reward normalised in its groups, then weighted
            advantages = group_advantages(
                columns, config.group_size, estimator="gdpo", weights=self.reward_weights,
                scale=SCALE_REWARDS[config.scale_rewards])[:, None] * mask
            advantages = masked_whiten(advantages, mask) * mask
        elif estimator not in KL_IN_REWARD:
            advantages = group_advantages(
                scores, config.group_size, estimator=estimator, lengths=mask.sum(1),
                baselines=baselines, scale=SCALE_REWARDS[config.scale_rewards],
            )[:, None] * mask
            if estimator == "reinforce_plus_plus_baseline":
                advantages = masked_whiten(advantages, mask) * mask
        else:
            rewards = rewards - config.kl_coef * (old_logp - ref_logp) * mask  # the KL penalty
            rewards = rewards + distill
            if estimator == "gae":
                advantages, returns = gae(rewards, values, mask,
                                          **GAE_OPTIONS.pick(vars(config)))
                if config.whiten_advantages:
                    advantages = masked_whiten(advantages, mask) * mask
            else:  # reinforce_plus_plus: the whitened discounted returns, no critic
                advantages = masked_whiten(
                    discounted_returns(rewards, mask, gamma=config.gamma), mask) * mask
        if estimator not in KL_IN_REWARD:  # a token's own distillation reward, undiscounted
            advantages = advantages + distill
        return Rollout(sequences, attention_mask, width, mask, old_logp, ref_logp, values,
                       scores, columns, advantages, returns, teacher_logp, rollout_logp)

    def update(self, rollout: Rollout) -> dict[str, float]:
        """ppo_epochs passes of minibatch PPO steps on `rollout`, one optimizer step per
        gradient_accumulation_steps minibatches; returns the metrics."""
        config = self.config
        critic = config.advantage_estimator == "gae"
        sums: dict[str, torch.Tensor] = {}  # on the device: read back once, at the end
        steps = micro_batches = 0
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        for _ in range(config.ppo_epochs):
            order = torch.randperm(rollout.mask.shape[0], device=rollout.mask.device)
            minibatches = order.split(config.mini_batch_size)
            accumulation = config.gradient_accumulation_steps
            groups = [minibatches[start:start + accumulation]
                      for start in range(0, len(minibatches), accumulation)]
            # read on the host once per epoch, before its steps, which then wait for nothing
            counts = self.global_counts(rollout.mask, groups)
            for group, group_counts in zip(groups, counts):
                for key, value in self._accumulate_gradients(rollout, group,
                                                             group_counts).items():
                    sums[key] = combine_metric(key, sums.get(key), value)
                lr = self.loop.apply_gradients(parameters)
                steps += 1
                micro_batches += len(group)
        mask = rollout.mask
        metrics = host_floats({
            # the loss terms add up over an optimizer step's minibatches (each is its share
            # of the step's); the statistics (clipfrac, ...) are each minibatch's means
            **{key: value if key in MAX_METRICS else
               value / (steps if key in ADDITIVE_METRICS else micro_batches)
               for key, value in sums.items()},
            "reward": rollout.scores.mean(),
            "kl": ((rollout.old_logp - rollout.ref_logp) * mask).sum(1).mean(),
            "response_length": mask.sum(1).mean(),
        })
        if rollout.teacher_logp is not None:  # the reverse KL to the teacher, per answer
            metrics["teacher_kl"] = host_floats({"kl": (
                (rollout.old_logp - rollout.teacher_logp) * mask).sum(1).mean()})["kl"]
        if not critic:
            del metrics["value_loss"]
        metrics["lr"] = lr
        return self.run.mean_over_ranks(metrics)

    def _accumulate_gradients(self, rollout: Rollout, group: Sequence[torch.Tensor],
                              counts: dict[str, int]) -> dict[str, torch.Tensor]:
        """Backward of each minibatch (rows of `rollout`) of one optimizer step, each
        loss its share of the whole group's (`counts`: ppo_loss's global counts over the
        group and the processes), so the gradients add up to the group's as one batch;
        DDP reduces them once, on the last. Returns the sums of the minibatches'
        metrics."""
        ddp = isinstance(self.actor_critic, nn.parallel.DistributedDataParallel)
        sums: dict[str, torch.Tensor] = {}
        logged = LOGGED_LOSS_OUTPUTS + (ROLLOUT_OUTPUTS if self.logs_rollout_statistics(
            rollout) else ())
        for index, rows in enumerate(group):
            sync = index == len(group) - 1 or not ddp
            with contextlib.nullcontext() if sync else self.actor_critic.no_sync():
                out = self._loss(rollout, rows, counts)
                out.loss.backward()
            for key in logged:
                sums[key] = combine_metric(key, sums.get(key), getattr(out, key).detach())
        return sums

    def logs_rollout_statistics(self, rollout: Rollout) -> bool:
        """Whether ppo_loss's rollout statistics mean something: it has the hook's
        rollout_logp, or bypass_mode corrects the rollout against the policy."""
        config = self.config
        return (rollout.rollout_logp is not None and passes_rollout_logp(config)) or (
            config.policy_loss == "bypass_mode" and corrects_rollouts(config))

    def _minibatch_loss(self, rollout: Rollout, rows: torch.Tensor,
                        counts: dict[str, int]) -> Any:
        """ppo_loss's output on the rollout's `rows` (the policy's log-probs, entropy and
        values recomputed with gradients), with the global `counts`."""
        config = self.config
        critic = config.advantage_estimator == "gae"
        # the KL is in the rewards already for gae and reinforce_plus_plus, in the loss else
        kl_in_loss = config.advantage_estimator not in KL_IN_REWARD
        loss_options = PPO_OPTIONS.pick(vars(config)) | dict(max_len=config.max_new_tokens)
        loss_options |= dict(vf_coef=0.0) if not critic else {}
        loss_options |= dict(kl_coef=0.0) if not kl_in_loss else {}
        loss_inputs = dict(
            old_logp=rollout.old_logp[rows], advantages=rollout.advantages[rows],
            mask=rollout.mask[rows],
            ref_logp=rollout.ref_logp[rows] if kl_in_loss else None,
            old_values=rollout.values[rows] if critic else None,
            returns=rollout.returns[rows] if critic else None,
            rollout_logp=rollout.rollout_logp[rows] if rollout.rollout_logp is not None
            and passes_rollout_logp(config) else None,
            **loss_options, **counts)
        batch = (rollout.sequences[rows], rollout.attention_mask[rows], rollout.prompt_width)
        with self.run.autocast():
            if self.fused_linear:  # linear_ppo_loss: 3 GEMMs, no logits kept
                return self.actor_critic(*batch, ppo=loss_inputs)
            logp, entropy, values = self.actor_critic(*batch)
        return ppo_loss(logp, entropy=entropy, values=values, **loss_inputs)

    # --- plumbing ----------------------------------------------------------------------

    def global_counts(self, mask: torch.Tensor, groups: Sequence[Sequence[torch.Tensor]]
                      ) -> list[dict[str, int]]:
        """ppo_loss's global normalisers for each optimizer step (a group of minibatches,
        rows of `mask`) of every rank: each minibatch's loss is its share of the global
        batch's, so the sum over minibatches and DDP's average over ranks of gradients is
        the global batch's gradient, however the valid tokens fall. One all_reduce and
        one read on the host for all the groups; {} each for one process and one
        minibatch per step (the call's own)."""
        if self.run.world == 1 and all(len(group) == 1 for group in groups):
            return [{} for _ in groups]
        valid = mask != 0
        local = torch.stack([torch.stack([valid[rows].sum(), valid[rows].any(-1).sum()])
                             for rows in (torch.cat(list(group)) for group in groups)])
        totals = self.run.sum_over_ranks_tensor(local.to(torch.float64)).tolist()
        counts = []
        for group, (tokens, rows) in zip(groups, totals):
            if self.config.agg == "seq-mean-token-sum-norm":
                rows = sum(len(minibatch) for minibatch in group) * self.run.world
            if tokens == 0 or rows == 0:  # nothing valid anywhere: the loss is 0 regardless
                counts.append(dict(dp_size=self.run.world))
            else:
                counts.append(dict(batch_num_tokens=int(tokens), global_batch_size=int(rows),
                                   dp_size=self.run.world))
        return counts

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, width - len(sequence):] = torch.tensor(sequence)
            mask[row, width - len(sequence):] = 1
        return ids.to(self.run.device), mask.to(self.run.device)

    def _score(self, records: list[dict[str, Any]], answers: torch.Tensor,
               mask: torch.Tensor, sequences: torch.Tensor, attention_mask: torch.Tensor
               ) -> torch.Tensor:
        """[B, K] fp32 scores, one column per reward source: a reward function on the
        decoded text (`call_reward_function`), or a reward model's output at each
        sequence's last attended token. answers, mask: [B, R], 1 through the first EOS."""
        device = self.run.device
        texts = completion_ids = None
        columns = [] if self.rewards else [torch.zeros(len(records), device=device)]
        for reward in self.rewards:
            if reward.function is not None:
                if texts is None:
                    texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
                    completion_ids = [row[keep].tolist() for row, keep in zip(answers, mask)]
                scores = call_reward_function(reward, records, texts, completion_ids)
            else:
                with self.run.autocast():
                    per_token = reward.scorer(sequences, attention_mask)
                last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
                scores = per_token[torch.arange(len(records), device=device), last].float()
            columns.append(check_finite_scores(scores, reward.name).to(device))
        return torch.stack(columns, 1)

    def save_checkpoint(self) -> Path | None:
        """Write checkpoint-<step>/ (`Loop.save_checkpoint`); every process must call it."""
        return self.loop.save_checkpoint()

    def _critic_prefix(self) -> str:
        """Where the critic's weights sit in the actor-critic's state dict."""
        return "critic." if isinstance(self.value_model, ValueModel) else "critic.model."

    def _save_final(self, weights: dict[str, Any]) -> None:
        """The policy as a transformers folder, final/, and the critic as one,
        value_model/ (a `ValueModel`: its backbone and value_head.safetensors, which
        `ValueModel.from_pretrained` and --value-model read), from the full state dict of
        the actor-critic."""
        output = Path(self.config.output_dir)
        save_pretrained_atomic(self.policy, self.tokenizer, output / "final",
                               strip_prefix(weights, "actor.model."))
        if self.value_model is not None:
            save_pretrained_atomic(self.value_model, None, output / "value_model",
                                   strip_prefix(weights, self._critic_prefix()))
