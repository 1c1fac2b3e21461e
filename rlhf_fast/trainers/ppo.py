"""A reference PPO / GRPO trainer on transformers causal LMs, built on rlhf-fast's ops.

One iteration, top to bottom (`PPOTrainer.iteration`, then `rollout`, `update`):
1. rollout: sample `group_size` answers to each of a batch of prompts with `generate`
   (temperature, top-p, stop at EOS); an answer's tokens count up to its first EOS;
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

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from rlhf_fast.trainers.checkpoints import model_identity, strip_prefix
from rlhf_fast.trainers.data import example_indices, tokenized_prompts
from rlhf_fast.trainers.files import save_atomic, save_pretrained_atomic
from rlhf_fast.trainers.loop import Loop, start_run
from rlhf_fast.trainers.metrics import host_floats
from rlhf_fast.trainers.models import (
    ActorCritic,
    TokenLogprobs,
    ValueModel,
    as_value_module,
    frozen,
    only_generation_config,
    prepare_for_training,
)
from rlhf_fast.trainers.ppo_config import KL_IN_REWARD, SCALE_REWARDS, PPOConfig
from rlhf_fast.trainers.run import unwrap, wrap_ddp

if TYPE_CHECKING:
    from transformers import GenerationConfig

RewardFn = Callable[[list[str], list[str]], Sequence[float] | torch.Tensor]
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
    the teacher's log-probs of the sampled tokens (None without a teacher).
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


@dataclass
class Reward:
    """One reward source: a function of the decoded text, or a frozen reward model with
    its per-position scorer; `name` says which in errors."""

    name: str
    function: RewardFn | None = None
    model: nn.Module | None = None
    scorer: nn.Module | None = None

    @classmethod
    def of(cls, source: RewardFn | nn.Module, device: torch.device) -> Reward:
        if callable(source) and not isinstance(source, nn.Module):
            return cls(f"reward function {function_name(source)}", function=source)
        model = frozen(source).to(device)
        return cls("the reward model", model=model, scorer=as_value_module(model))


def function_name(function: Callable[..., Any]) -> str:
    """module.qualname of a function (or the type of a callable object)."""
    named = function if hasattr(function, "__qualname__") else type(function)
    return f"{named.__module__}.{named.__qualname__}"


def check_same_vocabulary(teacher: nn.Module, policy: nn.Module) -> None:
    """The teacher scores the policy's tokens: its lm_head must have the policy's rows."""
    rows = [model.get_output_embeddings().weight.shape[0] for model in (teacher, policy)]
    if rows[0] != rows[1]:
        raise ValueError(f"teacher must share the policy's vocabulary: its lm_head has "
                         f"{rows[0]} rows, the policy's {rows[1]}")


def check_finite_scores(scores: torch.Tensor, source: str) -> torch.Tensor:
    """`scores` [B], unless one is NaN or infinite: it would make every advantage of its
    group NaN, NaN weights after the update, and the next rollout fail in sampling."""
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{source} gave non-finite scores (NaN or inf) to {len(bad)} of "
                         f"{scores.numel()} answers, e.g. answer {bad[0]}: "
                         f"{scores[bad[0]].item()}; scores must be finite numbers")
    return scores


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
    """

    def __init__(self, policy: nn.Module, ref_policy: nn.Module | None = None,
                 value_model: nn.Module | None = None,
                 reward_fn_or_model: RewardFn | nn.Module | Sequence[RewardFn | nn.Module]
                 | None = None, *,
                 tokenizer: Any, prompts: Any, config: PPOConfig | None = None,
                 teacher: nn.Module | None = None):
        self.config = config = config or PPOConfig()
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
        self.prompts, self.prompt_ids = tokenized_prompts(
            prompts, tokenizer, max_prompt_length=config.max_prompt_length, name="prompts",
            split=config.data_split)
        if len(self.prompts) < config.rollout_batch_size * self.run.world:
            raise ValueError(f"prompts has {len(self.prompts)} entries, fewer than one "
                             f"rollout (rollout_batch_size x processes)")

        self.fused_linear = self.run.fused_linear(config.use_fused_linear)
        device = self.run.device
        self.policy = policy.to(device)
        self.reference = TokenLogprobs(
            frozen(copy.deepcopy(policy) if ref_policy is None else ref_policy).to(device),
            fused_linear=self.fused_linear, temperature=config.temperature)
        critic = None
        if not critic_free:
            value_model = value_model or ValueModel.from_causal_lm(policy)
            critic = as_value_module(value_model.to(device))
        self.value_model = value_model
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
        frozen_models = {"reference": model_identity(self.reference.model)} | {
            "reward model" + (f" {i}" if len(sources) > 1 else ""): model_identity(r.model)
            for i, r in enumerate(self.rewards)} | ({} if self.teacher is None else {
                "teacher": model_identity(self.teacher.model)})
        for trained in (policy, value_model):
            if trained is not None:
                prepare_for_training(trained, config)
        actor = TokenLogprobs(policy, fused_linear=self.fused_linear,
                              temperature=config.temperature)
        self.actor_critic = wrap_ddp(ActorCritic(actor, critic), self.run)
        groups = [{"params": [p for p in policy.parameters() if p.requires_grad]}]
        if critic is not None:
            groups.append({"params": [p for p in critic.parameters() if p.requires_grad],
                           "lr": config.value_lr or config.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr,
                                           weight_decay=config.weight_decay)
        # update() averages its metrics over the processes: the window holds their means
        self.loop = Loop(config, self.run, self.optimizer, unwrap(self.actor_critic),
                         "actor_critic", frozen_models, name="PPO",
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
                               save_final=self._save_final)

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
        sequences, attention_mask, scores = self._answer_and_score(
            prompt_ids, prompt_mask, rows, self.generation_config())
        baselines = None
        if config.advantage_estimator == "remax":  # a greedy answer per prompt
            from transformers import GenerationConfig

            greedy = GenerationConfig(do_sample=False, max_new_tokens=config.max_new_tokens,
                                      eos_token_id=self.eos_id, pad_token_id=self.pad_id)
            group = config.group_size
            _, _, greedy_scores = self._answer_and_score(
                prompt_ids[::group], prompt_mask[::group], rows[::group], greedy)
            baselines = (greedy_scores @ self.reward_weights).repeat_interleave(group)
        return self.evaluate_answers(sequences, attention_mask, prompt_ids.shape[1], scores,
                                     baselines)

    def _answer_and_score(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          rows: list[int], generation_config: GenerationConfig
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generate an answer to each left-padded prompt, cut after its first EOS, and
        score it: (sequences, attention_mask, scores [B, K] fp32, one column per reward
        source, missing_eos_penalty taken off each)."""
        self.policy.eval()
        with self.run.autocast(), only_generation_config(self.policy, generation_config):
            sequences = self.policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                             generation_config=generation_config)
        self.policy.train()
        answers = sequences[:, prompt_ids.shape[1]:]
        is_eos = answers == self.eos_id
        mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # through the first EOS
        answers = answers.masked_fill(~mask, self.pad_id)
        sequences = torch.cat([prompt_ids, answers], 1)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)
        scores = self._score([self.prompts[r] for r in rows], answers, sequences,
                             attention_mask)
        if self.config.missing_eos_penalty is not None:
            scores = scores - self.config.missing_eos_penalty * (~is_eos.any(1)).float()[:, None]
        return sequences, attention_mask, scores

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
                         baselines: torch.Tensor | None = None) -> Rollout:
        """Log-probs, values and advantages of scored answers: the rest of a rollout.

        sequences, attention_mask: [B, width + R], prompts left-padded to `width`, answers
        right-padded; scores: [B, K] fp32, one column per reward source (or [B], one
        source); baselines: [B], remax's greedy scores.
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
                       scores, columns, advantages, returns, teacher_logp)

    def update(self, rollout: Rollout) -> dict[str, float]:
        """ppo_epochs passes of minibatch PPO steps on `rollout`; returns the metrics."""
        config = self.config
        critic = config.advantage_estimator == "gae"
        kl_in_loss = config.advantage_estimator not in KL_IN_REWARD
        # the KL is in the rewards already for gae and reinforce_plus_plus, in the loss else
        loss_options = PPO_OPTIONS.pick(vars(config)) | dict(max_len=config.max_new_tokens)
        loss_options |= dict(vf_coef=0.0) if not critic else {}
        loss_options |= dict(kl_coef=0.0) if not kl_in_loss else {}
        sums: dict[str, torch.Tensor] = {}  # on the device: read back once, at the end
        steps = 0
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        for _ in range(config.ppo_epochs):
            order = torch.randperm(rollout.mask.shape[0], device=rollout.mask.device)
            for rows in order.split(config.mini_batch_size):
                loss_inputs = dict(
                    old_logp=rollout.old_logp[rows], advantages=rollout.advantages[rows],
                    mask=rollout.mask[rows],
                    ref_logp=rollout.ref_logp[rows] if kl_in_loss else None,
                    old_values=rollout.values[rows] if critic else None,
                    returns=rollout.returns[rows] if critic else None,
                    **loss_options, **self.global_counts(rollout.mask[rows]))
                batch = (rollout.sequences[rows], rollout.attention_mask[rows],
                         rollout.prompt_width)
                with self.run.autocast():
                    if self.fused_linear:  # linear_ppo_loss: 3 GEMMs, no logits kept
                        out = self.actor_critic(*batch, ppo=loss_inputs)
                    else:
                        logp, entropy, values = self.actor_critic(*batch)
                if not self.fused_linear:
                    out = ppo_loss(logp, entropy=entropy, values=values, **loss_inputs)
                out.loss.backward()
                lr = self.loop.apply_gradients(parameters)
                steps += 1
                for key in ("loss", "policy_loss", "value_loss", "entropy", "clipfrac",
                            "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl",
                            "ratio_mean"):
                    sums[key] = sums.get(key, 0.0) + getattr(out, key).detach()
        mask = rollout.mask
        metrics = host_floats({
            **{key: value / steps for key, value in sums.items()},
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

    # --- plumbing ----------------------------------------------------------------------

    def global_counts(self, mask: torch.Tensor) -> dict[str, int]:
        """ppo_loss's global normalisers for one minibatch step of every rank (one
        all_reduce of two counts): each rank's loss is its share of the global batch's,
        so DDP's average of gradients is the global batch's gradient, however the valid
        tokens fall on the ranks. {} for one process."""
        if self.run.world == 1:
            return {}
        valid = mask != 0
        local = torch.stack([valid.sum(), valid.any(-1).sum()]).to(torch.float64)
        tokens, rows = self.run.sum_over_ranks_tensor(local).tolist()
        if self.config.agg == "seq-mean-token-sum-norm":
            rows = mask.shape[0] * self.run.world
        if tokens == 0 or rows == 0:  # nothing valid anywhere: the loss is 0 regardless
            return dict(dp_size=self.run.world)
        return dict(batch_num_tokens=int(tokens), global_batch_size=int(rows),
                    dp_size=self.run.world)

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, width - len(sequence):] = torch.tensor(sequence)
            mask[row, width - len(sequence):] = 1
        return ids.to(self.run.device), mask.to(self.run.device)

    def _score(self, prompts: list[str], answers: torch.Tensor, sequences: torch.Tensor,
               attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, K] fp32 scores, one column per reward source: a reward function on the
        decoded text, or a reward model's output at each sequence's last attended token."""
        device = self.run.device
        texts = None
        columns = [] if self.rewards else [torch.zeros(len(prompts), device=device)]
        for reward in self.rewards:
            if reward.function is not None:
                if texts is None:
                    texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
                scores = torch.as_tensor(reward.function(prompts, texts), dtype=torch.float32)
                if scores.shape != (len(prompts),):
                    raise ValueError(f"{reward.name} must return {len(prompts)} scores, got "
                                     f"shape {tuple(scores.shape)}")
            else:
                with self.run.autocast():
                    per_token = reward.scorer(sequences, attention_mask)
                last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
                scores = per_token[torch.arange(len(prompts), device=device), last].float()
            columns.append(check_finite_scores(scores, reward.name).to(device))
        return torch.stack(columns, 1)

    def save_checkpoint(self) -> Path | None:
        """Write checkpoint-<step>.pt (`Loop.save_checkpoint`); every process must call it."""
        return self.loop.save_checkpoint()

    def _save_final(self, weights: dict[str, Any]) -> None:
        """The policy as a transformers folder, final/, and the critic's state dict,
        value_model.pt, from the full state dict of the actor-critic."""
        output = Path(self.config.output_dir)
        save_pretrained_atomic(self.policy, self.tokenizer, output / "final",
                               strip_prefix(weights, "actor.model."))
        if self.value_model is not None:
            critic_prefix = "critic." if isinstance(self.value_model, ValueModel) \
                else "critic.model."
            save_atomic(strip_prefix(weights, critic_prefix), output / "value_model.pt")
