"""The rollout side of `rlhf_fast.trainers.ppo.PPOTrainer`: answers sampled to a batch
of prompts and scored (`AnswerSampler`: the policy's ``generate`` or the generation hook,
`rlhf_fast.trainers.generation`; the reward sources, `rlhf_fast.trainers.rewards`), the
`Rollout` the update reads, the checks of the hook's log-probs against the config's
rollout correction, and the update's view of a rollout's minibatches: ppo_loss's global
normalisers and which of its outputs are logged, and how they add up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from rlhf_fast.reference import ROLLOUT_STATISTICS
from rlhf_fast.trainers.data import batches
from rlhf_fast.trainers.generation import (
    GenerateFn,
    check_generation,
    completion_tensors,
    hook_sampling,
)
from rlhf_fast.trainers.models import only_generation_config
from rlhf_fast.trainers.ppo_config import PPOConfig
from rlhf_fast.trainers.rewards import (
    Reward,
    call_reward_function,
    check_finite_scores,
    function_name,
)
from rlhf_fast.trainers.run import Run

if TYPE_CHECKING:
    from transformers import GenerationConfig


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


def logs_rollout_statistics(config: PPOConfig, rollout: Rollout) -> bool:
    """Whether ppo_loss's rollout statistics mean something: it has the hook's
    rollout_logp, or bypass_mode corrects the rollout against the policy."""
    return (rollout.rollout_logp is not None and passes_rollout_logp(config)) or (
        config.policy_loss == "bypass_mode" and corrects_rollouts(config))


class AnswerSampler:
    """Answers to left-padded prompts, sampled and scored: by the policy's ``generate`` (at
    the config's temperature and top-p) or a generate_fn hook, cut after their first EOS,
    scored by each reward source (`rlhf_fast.trainers.rewards.Reward`)."""

    def __init__(self, policy: nn.Module, tokenizer: Any, rewards: list[Reward], run: Run,
                 config: PPOConfig, eos_id: int, pad_id: int):
        self.policy, self.tokenizer, self.rewards = policy, tokenizer, rewards
        self.run, self.config, self.eos_id, self.pad_id = run, config, eos_id, pad_id

    def left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts [B, P], left-padded to the longest, and their attention mask, on the
        run's device."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, width - len(sequence):] = torch.tensor(sequence)
            mask[row, width - len(sequence):] = 1
        return ids.to(self.run.device), mask.to(self.run.device)

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 generation_config: GenerationConfig, seed: int,
                 generate_fn: GenerateFn | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(answers [B, R] int64, rollout_logp [B, R] fp32 or None) to the left-padded
        prompts [B, P]: the policy's ``generate`` (its sequences past the prompts; no
        log-probs), or the generate_fn hook's completions, right-padded (with its
        log-probs, if it returned them, `check_generation`). generate's rows run on past
        an answer's first EOS (its padding): the caller cuts there."""
        if generate_fn is None:
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
            generation = generate_fn(prompts, seed=seed, **sampling)
        finally:
            self.policy.train()
        generation = check_generation(
            generation, rows=len(prompts), eos_id=self.eos_id,
            vocab_size=self.policy.get_output_embeddings().weight.shape[0],
            max_new_tokens=sampling["max_new_tokens"])
        return completion_tensors(generation, self.pad_id, prompt_ids.device)

    def answer_and_score(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         records: list[dict[str, Any]], generation_config: GenerationConfig,
                         seed: int, generate_fn: GenerateFn | None) -> Answers:
        """Generate an answer to each left-padded prompt (`generate`; `seed` for a
        generate_fn), cut after its first EOS, and score it: `Answers`, the scores with
        missing_eos_penalty taken off each column."""
        answers, rollout_logp = self.generate(prompt_ids, prompt_mask, generation_config,
                                              seed, generate_fn)
        is_eos = answers == self.eos_id
        mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # through the first EOS
        answers = answers.masked_fill(~mask, self.pad_id)
        sequences = torch.cat([prompt_ids, answers], 1)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)
        scores = self.score(records, answers, mask, sequences, attention_mask)
        if self.config.missing_eos_penalty is not None:
            scores = scores - self.config.missing_eos_penalty * (~is_eos.any(1)).float()[:, None]
        if rollout_logp is not None:
            rollout_logp = rollout_logp * mask
        return Answers(sequences, attention_mask, scores, rollout_logp)

    def mean_score(self, records: list[dict[str, Any]], prompt_ids: list[list[int]],
                   weights: torch.Tensor, generation_config: GenerationConfig, seed: int,
                   generate_fn: GenerateFn | None) -> float:
        """The mean weighted score of answers to the prompts (each process answers its
        share, rollout_batch_size at a time). Under `torch.random.fork_rng`, seeded with
        `seed`: the training's random streams are left as they were, and every call
        samples alike."""
        run = self.run
        mine = list(range(run.rank, len(records), run.world))
        total = torch.zeros(2, dtype=torch.float64, device=run.device)  # score sum, count
        devices = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for rows in batches(mine, self.config.rollout_batch_size):
                prompts, prompt_mask = self.left_pad([prompt_ids[r] for r in rows])
                columns = self.answer_and_score(
                    prompts, prompt_mask, [records[r] for r in rows],
                    generation_config, seed, generate_fn).scores
                total += torch.stack([(columns @ weights).sum().double(),
                                      torch.tensor(len(rows), dtype=torch.float64,
                                                   device=run.device)])
        total = run.sum_over_ranks_tensor(total) if run.world > 1 else total
        return (total[0] / total[1].clamp(min=1)).item()

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

    def score(self, records: list[dict[str, Any]], answers: torch.Tensor,
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


# --- the update's minibatches: ppo_loss's global counts, its logged outputs ------------

#: ppo_loss's outputs the update logs; the loss terms among them add up over the
#: minibatches of an optimizer step (`ADDITIVE_METRICS`), the others are their means
LOGGED_LOSS_OUTPUTS = ("loss", "policy_loss", "value_loss", "entropy", "clipfrac",
                       "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl",
                       "ratio_mean")
#: ppo_loss's statistics of the rollout correction (the mismatch between the rollout
#: engine's log-probs and the policy's), logged when it has them: rollout_is_max is the
#: max over the minibatches, the others their means
ROLLOUT_OUTPUTS = ROLLOUT_STATISTICS
ADDITIVE_METRICS = ("loss", "policy_loss", "value_loss", "entropy")
MAX_METRICS = ("rollout_is_max",)


def combine_metric(key: str, total: torch.Tensor | None, value: torch.Tensor
                   ) -> torch.Tensor:
    """A metric's running total over minibatches: the max for `MAX_METRICS`, else the sum."""
    if total is None:
        return value
    return torch.maximum(total, value) if key in MAX_METRICS else total + value


def global_counts(mask: torch.Tensor, groups: Sequence[Sequence[torch.Tensor]], run: Run,
                  agg: str) -> list[dict[str, int]]:
    """ppo_loss's global normalisers for each optimizer step (a group of minibatches,
    rows of `mask`) of every rank: each minibatch's loss is its share of the global
    batch's, so the sum over minibatches and DDP's average over ranks of gradients is
    the global batch's gradient, however the valid tokens fall. One all_reduce and
    one read on the host for all the groups; {} each for one process and one
    minibatch per step (the call's own)."""
    if run.world == 1 and all(len(group) == 1 for group in groups):
        return [{} for _ in groups]
    valid = mask != 0
    local = torch.stack([torch.stack([valid[rows].sum(), valid[rows].any(-1).sum()])
                         for rows in (torch.cat(list(group)) for group in groups)])
    totals = run.sum_over_ranks_tensor(local.to(torch.float64)).tolist()
    counts = []
    for group, (tokens, rows) in zip(groups, totals):
        if agg == "seq-mean-token-sum-norm":
            rows = sum(len(minibatch) for minibatch in group) * run.world
        if tokens == 0 or rows == 0:  # nothing valid anywhere: the loss is 0 regardless
            counts.append(dict(dp_size=run.world))
        else:
            counts.append(dict(batch_num_tokens=int(tokens), global_batch_size=int(rows),
                               dp_size=run.world))
    return counts
