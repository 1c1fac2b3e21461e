"""A reference DPO trainer on transformers causal LMs, built on rlhf-fast's fused ops.

One training step, top to bottom (`DPOTrainer.optimizer_step`, then `_pair_loss`):
1. take a batch of {prompt, chosen, rejected} records, tokenised once up front: prompt
   tokens, then each answer followed by EOS;
2. stack the chosen and the rejected sequences into one [2B, L] batch and run the policy
   once: per-token log-probs by `linear_logprobs` on the last hidden state and the
   lm_head weight (`use_fused_linear`, the [2B*L, V] logits never exist) or by `logprobs`
   on the model's logits;
3. sum them over each answer's tokens (`sequence_logps`; prompt and padding masked out),
   and get the same from the frozen reference (precomputed once, or per batch);
   (`pair_logps`: LD-DPO's weighted sums with ld_alpha, WPO's pair weights with
   use_weighting);
4. `dpo_loss` on the four sequence log-probs (or another objective on the same stacked
   batch: `simpo_loss`, `cpo_loss`, `orpo_loss`, or `kto_loss` on unpaired records, whose
   second half holds each prompt with another record's completion for the KL estimate),
   backward, clip, AdamW step.

`rlhf_fast.trainers.loop` runs the steps: logging, evaluation, checkpoints, the final model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_fast import cpo_loss, dpo_loss, kto_loss, orpo_loss, pair_logps, simpo_loss
from rlhf_fast.ops.pair_logps import dpo_inputs
from rlhf_fast.options import DPO_OPTIONS, KTO_OPTIONS, Checked
from rlhf_fast.trainers.checkpoints import Export
from rlhf_fast.trainers.data import batches, example_indices, tokenized_pairs
from rlhf_fast.trainers.dpo_config import (
    OBJECTIVES,
    REFERENCE_FREE_OBJECTIVES,
    DPOConfig,
    objective,
    record_kind,
)
from rlhf_fast.trainers.files import save_pretrained_atomic
from rlhf_fast.trainers.loop import Loop, start_run
from rlhf_fast.trainers.metrics import host_floats
from rlhf_fast.trainers.models import (
    TokenLogprobs,
    prepare_for_training,
    reference_identity,
    reference_logprobs,
    with_adapter,
)
from rlhf_fast.trainers.pairs import PairBatch, collate_pairs
from rlhf_fast.trainers.run import wrap_ddp
from rlhf_fast.trainers.sources import has_splits

DPO_PLOT_KEYS = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                 "rewards/rejected", "logps/chosen", "logps/rejected", "eval/rewards/accuracies",
                 "eval/loss"]


class DPOTrainer:
    """Direct Preference Optimisation of `model` against a frozen reference.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``), trained in place.
        ref_model: the frozen reference; None takes a frozen copy of `model` as it is now
            (or none at all with ``config.reference_free``).
        tokenizer: the model's tokenizer; needs eos_token_id (pad defaults to EOS).
        train_dataset: records ``{"prompt", "chosen", "rejected"}`` or ``{"chosen",
            "rejected"}`` (implicit prompt; kto: ``{"prompt", "completion", "label"}``),
            strings or lists of messages (rendered with the tokenizer's chat template):
            a list of dicts, a JSONL / JSON / parquet file, a ``datasets.Dataset`` or
            ``DatasetDict`` (config.data_split), a dataset folder or a hub dataset id.
        eval_dataset: the same, scored at eval_steps and at the end (or none, and
            config.eval_split: that split of train_dataset's source).
        config: a `DPOConfig`.
        peft_config: a ``peft.LoraConfig`` (or any peft config): train an adapter on
            `model` (as config.use_peft does with the lora_* fields); without a ref_model
            the reference is `model` with the adapter disabled, not a copy.
    """

    def __init__(self, model: nn.Module, ref_model: nn.Module | None = None, *,
                 tokenizer: Any, train_dataset: Any, eval_dataset: Any = None,
                 config: DPOConfig | None = None, peft_config: Any = None):
        self.config = config = config or DPOConfig()
        self.run = start_run(config)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self.labels: dict[str, torch.Tensor] = {}  # kto: each record's label, per split
        self.train_pairs = self._tokenized(train_dataset, "train")
        self.eval_pairs = None
        if eval_dataset is None and config.eval_split is not None:
            if not has_splits(train_dataset):
                raise ValueError(f"DPOConfig.eval_split={config.eval_split!r} with no "
                                 "eval_dataset needs a train_dataset with several splits (a "
                                 "DatasetDict, a dataset folder or a hub id)")
            eval_dataset = train_dataset
        if eval_dataset is not None:
            self.eval_pairs = self._tokenized(eval_dataset, "eval")
        global_batch = config.batch_size * self.run.world
        if len(self.train_pairs) < global_batch:
            raise ValueError(f"train_dataset has {len(self.train_pairs)} records, fewer than "
                             f"one global batch (batch_size x processes = {global_batch})")

        self.fused_linear = self.run.fused_linear(config.use_fused_linear)
        model = with_adapter(model, config, peft_config)
        model.to(self.run.device)
        prepare_for_training(model, config)
        self.model = model
        self.policy = wrap_ddp(TokenLogprobs(model, fused_linear=self.fused_linear), self.run)
        self.reference = None
        if not config.reference_free and config.loss_type not in REFERENCE_FREE_OBJECTIVES:
            self.reference = reference_logprobs(model, ref_model,
                                                fused_linear=self.fused_linear)
            self.reference.to(self.run.device)
        # checkpoints hold the policy, not its reference: they record which it was
        frozen_models = {"reference": None if self.reference is None
                         else reference_identity(self.reference)}
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=config.lr,
            weight_decay=config.weight_decay,
        )
        self.ref_logps: dict[str, torch.Tensor] = {}
        self._loss = config.compiled(self._pair_loss)
        self.loop = Loop(config, self.run, self.optimizer, model,
                         [Export("", "", model, tokenizer)], frozen_models,
                         training_steps=self.total_steps, name="DPO", title="DPO",
                         plot_keys=DPO_PLOT_KEYS,
                         restore=self._restore)
        if config.precompute_ref_logps and self.reference is not None and not self.ref_logps:
            self.ref_logps = {"train": self._score_all(self.train_pairs)}
            if self.eval_pairs is not None:
                self.ref_logps["eval"] = self._score_all(self.eval_pairs)
        if config.precompute_ref_logps:
            self.reference = None  # every record is scored: free the reference's memory

    # --- the algorithm ---------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        config = self.config
        if config.max_steps:
            return config.max_steps
        per_epoch = len(self.train_pairs) // (config.batch_size * self.run.world)
        micro_batches = int(config.num_epochs * per_epoch)
        return max(1, micro_batches // config.gradient_accumulation_steps)

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.loop.step

    def train(self) -> list[dict[str, float]]:
        """Run to total_steps (from the checkpoint's step when resuming); returns the
        logged metrics of this output_dir."""
        return self.loop.train(self.total_steps, self.optimizer_step,
                               save_final=self._save_final,
                               save_checkpoint=self.save_checkpoint,
                               evaluate=None if self.eval_pairs is None else self.evaluate,
                               eval_steps=self.config.eval_steps)

    def optimizer_step(self) -> tuple[float, int]:
        """One optimizer step over gradient_accumulation_steps micro-batches (metrics
        go to the logging window); returns the learning rate it used and the tokens it
        processed."""
        config = self.config
        self.model.train()
        accumulation = config.gradient_accumulation_steps
        tokens = torch.zeros((), dtype=torch.long, device=self.run.device)
        for micro in range(accumulation):
            batch = self._train_batch(self.loop.step * accumulation + micro)
            # DDP reduces gradients on every backward unless told to wait for the last
            # micro-batch (FSDP2 just reduces each time: correct, slower)
            sync = (micro == accumulation - 1
                    or not isinstance(self.policy, nn.parallel.DistributedDataParallel))
            with contextlib.nullcontext() if sync else self.policy.no_sync():
                out, metrics = self._loss(batch, "train")
                (out.loss / accumulation).backward()
            self.loop.window.add(metrics, 1.0 / accumulation)
            tokens += batch.num_tokens
        lr = self.loop.apply_gradients(self.model.parameters())
        self.loop.step += 1
        return lr, tokens

    def _pair_loss(self, batch: PairBatch, split: str):
        """The DPO loss of a stacked batch, and its metrics."""
        config, kind = self.config, objective(self.config.loss_type)
        pairs = batch.rows.numel()
        with self.run.autocast():
            token_logp = self.policy(batch.input_ids, batch.attention_mask,
                                     return_sum_p2=config.use_weighting)
        log_sum_p2 = None
        if config.use_weighting:
            token_logp, log_sum_p2 = token_logp
        policy = pair_logps(token_logp, batch.answer_mask, ld_alpha=config.ld_alpha,
                            log_sum_p2=log_sum_p2)
        reference = self._reference_logps(batch, split)
        if kind == "kto":  # the second half: each prompt with another's completion
            return self._kto_loss(torch.cat(policy[:2]), reference, batch, split)
        if kind in OBJECTIVES:
            loss = {"simpo": simpo_loss, "cpo": cpo_loss, "orpo": orpo_loss}[kind]
            out = loss(policy.chosen, policy.rejected, policy.chosen_lengths,
                       policy.rejected_lengths,
                       **OBJECTIVES[kind].field_values(config))
        else:
            options = DPO_OPTIONS.field_values(config)
            out = dpo_loss(policy.chosen, policy.rejected,
                           None if reference is None else reference[:pairs],
                           None if reference is None else reference[pairs:],
                           **dpo_inputs(policy, Checked(**options)), **options)
        metrics = {
            "loss": out.loss,
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/accuracies": out.reward_accuracy,
            "rewards/margins": out.reward_margin,
            "logps/chosen": policy.chosen.mean(),
            "logps/rejected": policy.rejected.mean(),
            **{name: getattr(out, name) for name in ("nll_loss", "log_odds_ratio",
                                                     "log_odds_chosen") if hasattr(out, name)},
        }
        return out, metrics

    def _kto_loss(self, policy: torch.Tensor, reference: torch.Tensor | None,
                  batch: PairBatch, split: str):
        """KTO on the first half's examples, its reference point (TRL's) the mean
        log-ratio of the second half's mismatched prompt / completion pairs, averaged
        over the processes, detached (kto_loss clamps it at 0)."""
        examples = batch.rows.numel()
        kl = None
        if reference is not None:
            kl = (policy[examples:] - reference[examples:]).mean().detach()
            kl = self.run.sum_over_ranks_tensor(kl.reshape(1)) / self.run.world
        desirable = self.labels[split if split in self.labels else "train"][batch.rows]
        out = kto_loss(policy[:examples], None if reference is None else reference[:examples],
                       desirable.to(policy.device), kl, **KTO_OPTIONS.field_values(self.config))
        metrics = {
            "loss": out.loss, "rewards/chosen": out.chosen_reward,
            "rewards/rejected": out.rejected_reward, "rewards/margins": out.reward_margin,
            "kl": out.kl, "logps": policy[:examples].mean(),
        }
        return out, metrics

    def _tokenized(self, data: Any, split: str) -> list[dict[str, list[int]]]:
        """The split's records, tokenised as pairs (kto: each record's completion, then
        the next record's as the mismatched one of its KL estimate; the labels kept).
        `data` is any source of `rlhf_fast.trainers.sources.load_source`; a DatasetDict, a
        dataset folder or a hub id gives config.data_split (eval: config.eval_split)."""
        config, name = self.config, f"{split}_dataset"
        pairs, labels = tokenized_pairs(
            data, self.tokenizer, max_prompt_length=config.max_prompt_length,
            max_length=config.max_length, name=name, kind=record_kind(config.loss_type),
            split=config.data_split if split == "train" else config.eval_split or "test")
        if labels is not None:
            self.labels[split] = labels
        return pairs

    def _reference_logps(self, batch: PairBatch, split: str) -> torch.Tensor | None:
        """[2B] reference sequence log-probs: precomputed, scored now, or None."""
        if split in self.ref_logps:
            scored = self.ref_logps[split][batch.rows]  # [B, 2]: chosen, rejected
            return scored.T.reshape(-1).to(self.run.device)
        if self.reference is None:
            return None
        with torch.no_grad(), self.run.autocast():
            token_logp = self.reference(batch.input_ids, batch.attention_mask)
        return self._answer_logps(token_logp, batch)

    def _answer_logps(self, token_logp: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        """[2B] each answer's log-prob: its tokens' sum, LD-DPO's weighted sum with
        ld_alpha."""
        return torch.cat(pair_logps(token_logp, batch.answer_mask,
                                    ld_alpha=self.config.ld_alpha)[:2])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and reward statistics over eval_dataset (prefixed "eval/")."""
        if self.eval_pairs is None:
            raise ValueError("evaluate() needs an eval_dataset")
        self.model.eval()
        totals: dict[str, float] = {}
        for rows in batches(list(range(len(self.eval_pairs))), self.config.eval_batch_size):
            batch = collate_pairs([self.eval_pairs[i] for i in rows], rows, self.pad_id,
                                  self.run.device)
            _, metrics = self._loss(batch, "eval")
            for key, value in host_floats(metrics).items():
                totals[key] = totals.get(key, 0.0) + value * len(rows)
        self.model.train()
        return {f"eval/{k}": v / len(self.eval_pairs) for k, v in totals.items()}

    # --- plumbing ----------------------------------------------------------------------

    def _train_batch(self, index: int) -> PairBatch:
        rows = example_indices(len(self.train_pairs), self.config.batch_size, self.run,
                               self.config.seed, index)
        return collate_pairs([self.train_pairs[i] for i in rows], rows, self.pad_id,
                             self.run.device)

    @torch.no_grad()
    def _score_all(self, pairs: list[dict[str, list[int]]]) -> torch.Tensor:
        """[n, 2] reference log-probs (chosen, rejected) of every pair, on the CPU."""
        scored = []
        for rows in batches(list(range(len(pairs))), self.config.eval_batch_size):
            batch = collate_pairs([pairs[i] for i in rows], rows, self.pad_id, self.run.device)
            both = self._reference_logps(batch, "none")
            scored.append(both.view(2, -1).T.float().cpu())
        return torch.cat(scored)

    def save_checkpoint(self) -> Path | None:
        """Write checkpoint-<step>/ (`Loop.save_checkpoint`) with the reference's
        precomputed log-probs; every process must call it."""
        return self.loop.save_checkpoint(ref_logps=self.ref_logps)

    def _restore(self, extra: dict[str, Any]) -> None:
        self.ref_logps = extra["ref_logps"]

    def _save_final(self, weights: dict[str, Any]) -> None:
        """The policy as a transformers folder, final/, from its full state dict."""
        save_pretrained_atomic(self.model, self.tokenizer, Path(self.config.output_dir) / "final",
                               weights)
