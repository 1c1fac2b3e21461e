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

Steps 1 and 2 are `rlhf_fast.trainers.rollout.AnswerSampler`'s; `rlhf_fast.trainers.loop`
runs the iterations: logging, checkpoints, the final models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from rlhf_fast.trainers.data import example_indices, tokenized_prompts
from rlhf_fast.trainers.files import save_pretrained_atomic
from rlhf_fast.trainers.generation import GenerateFn, generation_seed
from rlhf_fast.trainers.loop import Loop, start_run
from rlhf_fast.trainers.metrics import host_floats
from rlhf_fast.trainers.model_state import model_identity, strip_prefix
from rlhf_fast.trainers.models import (
    ActorCritic,
    TokenLogprobs,
    ValueModel,
    as_value_module,
    frozen,
    prepare_for_training,
    reference_identity,
    reference_logprobs,
    with_adapter,
)
from rlhf_fast.trainers.ppo_config import KL_IN_REWARD, SCALE_REWARDS, PPOConfig
from rlhf_fast.trainers.rewards import RewardFn, reward_sources
from rlhf_fast.trainers.rollout import (
    ADDITIVE_METRICS,
    LOGGED_LOSS_OUTPUTS,
    MAX_METRICS,
    ROLLOUT_OUTPUTS,
    AnswerSampler,
    Rollout,
    check_rollout_logp,
    combine_metric,
    global_counts,
    logs_rollout_statistics,
    passes_rollout_logp,
)
from rlhf_fast.trainers.run import unwrap, wrap_ddp

PPO_PLOT_KEYS = ["reward", "kl", "entropy", "clipfrac", "approx_kl", "policy_loss",
                 "value_loss", "response_length"]


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
            ValueError naming generate_fn. `vllm_generate_fn` makes one on vLLM's
            offline LLM.
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
        rewards, self.reward_weights = reward_sources(reward_fn_or_model,
                                                      config.reward_weights, device)
        self.sampler = AnswerSampler(policy, tokenizer, rewards, self.run, config,
                                     self.eos_id, self.pad_id)
        # checkpoints hold the policy and critic, not these: they record which they were
        frozen_models = {"reference": reference_identity(self.reference)} | {
            "reward model" + (f" {i}" if len(rewards) > 1 else ""): model_identity(r.model)
            for i, r in enumerate(rewards)} | ({} if self.teacher is None else {
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
        config, sampler = self.config, self.sampler
        generation_config = sampler.generation_config() if config.eval_do_sample else \
            sampler.greedy_generation_config()
        return {"eval/reward": sampler.mean_score(
            self.eval_records, self.eval_prompt_ids, self.reward_weights, generation_config,
            config.seed, self.generate_fn)}

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
        config, sampler = self.config, self.sampler
        rows = example_indices(len(self.prompts), config.rollout_batch_size, self.run,
                               config.seed, iteration)
        rows = [row for row in rows for _ in range(config.group_size)]
        prompt_ids, prompt_mask = sampler.left_pad([self.prompt_ids[r] for r in rows])
        records = [self.records[r] for r in rows]
        seed = generation_seed(config.seed, iteration, self.run.rank)
        answers = sampler.answer_and_score(prompt_ids, prompt_mask, records,
                                           sampler.generation_config(), seed, self.generate_fn)
        check_rollout_logp(config, answers.rollout_logp, self.generate_fn)
        baselines = None
        if config.advantage_estimator == "remax":  # a greedy answer per prompt
            group = config.group_size
            greedy_scores = sampler.answer_and_score(
                prompt_ids[::group], prompt_mask[::group], records[::group],
                sampler.greedy_generation_config(), seed, self.generate_fn).scores
            baselines = (greedy_scores @ self.reward_weights).repeat_interleave(group)
        return self.evaluate_answers(answers.sequences, answers.attention_mask,
                                     prompt_ids.shape[1], answers.scores, baselines,
                                     rollout_logp=answers.rollout_logp)

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
            counts = global_counts(rollout.mask, groups, self.run, config.agg)
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
        logged = LOGGED_LOSS_OUTPUTS + (ROLLOUT_OUTPUTS if logs_rollout_statistics(
            self.config, rollout) else ())
        for index, rows in enumerate(group):
            sync = index == len(group) - 1 or not ddp
            with contextlib.nullcontext() if sync else self.actor_critic.no_sync():
                out = self._loss(rollout, rows, counts)
                out.loss.backward()
            for key in logged:
                sums[key] = combine_metric(key, sums.get(key), getattr(out, key).detach())
        return sums

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
