"""The training loop both trainers share; the trainers keep only their algorithm.

A trainer starts its run (`start_run`), builds its models, data and optimizer, then a
`Loop` over them, and passes it its step to `Loop.train`. The step (PPO: an iteration, a
rollout and its update; DPO: an optimizer step over its micro-batches) computes the loss,
calls `Loop.apply_gradients` for each optimizer step, adds its metrics to `Loop.window`,
advances `Loop.step` by one and returns the learning rate it used and the tokens it
processed. The loop does the rest, the same for both:

- logging every logging_steps steps and at the last: the window's mean, lr, tokens/s and
  the GPU's peak memory, to stdout above the progress bar and to metrics.jsonl;
- evaluation every eval_steps steps and at the last, when the trainer has an evaluation;
- checkpoints every save_steps steps and at the last (step, the trained module's weights
  under the trainer's key, optimizer, LR schedule, logging window, the trainer's extra
  state, the frozen models' identities, every process's random streams, the config),
  and resuming from one;
- the final model (saved by the trainer's `save_final`), the plot of the curves, and
  the removal of temp files a killed save left behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_fast.trainers.checkpoints import (
    check_no_checkpoints,
    check_same_frozen_models,
    checkpoint_path,
    gather_training_state,
    load_resume_checkpoint,
    prune_checkpoints,
    restore_training_state,
)
from rlhf_fast.trainers.config import TrainerConfig
from rlhf_fast.trainers.files import remove_stale_temps, save_atomic
from rlhf_fast.trainers.metrics import MetricsLog, MetricsWindow, plot_curves, progress_bar
from rlhf_fast.trainers.resume import keep_configured_lrs, remove_checkpoints, warn_changed_config
from rlhf_fast.trainers.run import (
    Run,
    gather_rng_states,
    restore_rng_states,
    seed_process,
    setup_run,
)


def start_run(config: TrainerConfig) -> Run:
    """Refuse to start afresh in an output_dir holding checkpoints, join the processes,
    pick device and precision, and seed this process's random streams."""
    if config.resume_from is None:
        if config.overwrite_output_dir:
            remove_checkpoints(config.output_dir)
        check_no_checkpoints(config.output_dir)
    run = setup_run(config.precision, config.device)
    seed_process(config.seed, run)
    return run


def warmup_then_constant(optimizer: torch.optim.Optimizer, warmup_steps: int):
    """Linear warm-up from 0 to the configured lr over `warmup_steps`, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    )


class Loop:
    """A trainer's step count, optimizer schedule, logging window, log and checkpoints.

    Args:
        config, run: the trainer's config and `start_run`'s run.
        optimizer: the trainer's optimizer (its LR schedule: `warmup_then_constant`).
        module, key: the trained module whose state dict checkpoints hold (not a DDP
            wrapper), and the checkpoint's key for it.
        frozen_models: `model_identity` of each frozen model by role (the checkpoints
            record them and a resume refuses others).
        name, title, plot_keys: the progress bar's name (the plot is
            ``<name>_curves.png``), the plot's title and the metrics it shows.
        rank_means: whether the window holds this process's metrics, which the log
            averages over the processes (False: the step adds means over them already).
        restore: given a resumed checkpoint's state, restores the trainer's extra state.

    With config.resume_from, the checkpoint is loaded here and metrics.jsonl keeps the
    rows up to its step; else metrics.jsonl starts afresh.
    """

    def __init__(self, config: TrainerConfig, run: Run, optimizer: torch.optim.Optimizer,
                 module: nn.Module, key: str, frozen_models: dict[str, Any], *, name: str,
                 title: str, plot_keys: list[str], rank_means: bool = True,
                 restore: Callable[[dict[str, Any]], None] | None = None):
        self.config, self.run, self.optimizer = config, run, optimizer
        self.module, self.key, self.frozen_models = module, key, frozen_models
        self.name, self.title, self.plot_keys = name, title, plot_keys
        self.rank_means = rank_means
        self.scheduler = warmup_then_constant(optimizer, config.warmup_steps)
        self.step = 0
        self.window = MetricsWindow()
        if config.resume_from is not None:
            path, state = load_resume_checkpoint(config.resume_from, config.output_dir)
            self._load(path, state)
            if restore is not None:
                restore(state)
        self.log = MetricsLog(Path(config.output_dir) / "metrics.jsonl", run.is_main,
                              resume_step=None if config.resume_from is None else self.step)

    def apply_gradients(self, parameters: Iterable[nn.Parameter]) -> float:
        """Clip the gradient norm of `parameters` to max_grad_norm (0: no clip), step the
        optimizer and the LR schedule, zero the gradients; returns the lr the step used."""
        if self.config.max_grad_norm:
            nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def train(self, total_steps: int, step: Callable[[], tuple[float, float]], *,
              save_final: Callable[[dict[str, Any]], None],
              save_checkpoint: Callable[[], Any] | None = None,
              evaluate: Callable[[], dict[str, float]] | None = None,
              eval_steps: int = 0) -> list[dict[str, float]]:
        """Run `step` until `total_steps` steps are done (from the checkpoint's step when
        resuming); returns the logged metrics of the output_dir.

        save_final(weights): the main process saves the final model(s) from the trained
        module's full state dict. save_checkpoint: the trainer's (default: this loop's,
        with no extra state). evaluate: metrics to log at eval_steps and at the end.
        """
        config, run = self.config, self.run
        save_checkpoint = save_checkpoint or self.save_checkpoint
        if run.is_main:
            remove_stale_temps(config.output_dir)
        bar = progress_bar(total_steps, self.step, run.is_main, self.name)
        started, tokens = time.perf_counter(), 0
        while self.step < total_steps:
            lr, step_tokens = step()
            tokens += step_tokens
            bar.update(1)
            last = self.step == total_steps
            if self.step % config.logging_steps == 0 or last:
                elapsed = time.perf_counter() - started
                metrics = self.window.flush()  # the mean over the steps since the last row
                if self.rank_means:
                    metrics = run.mean_over_ranks(metrics)
                metrics["lr"] = lr
                metrics["tokens_per_s"] = run.sum_over_ranks(tokens) / max(elapsed, 1e-9)
                metrics.update(run.peak_memory())
                self.log.write(self.step, metrics, bar)
                started, tokens = time.perf_counter(), 0
            if evaluate is not None and (last or (eval_steps and self.step % eval_steps == 0)):
                self.log.write(self.step, evaluate(), bar)
            if last or (config.save_steps and self.step % config.save_steps == 0):
                save_checkpoint()
        bar.close()
        weights, _ = gather_training_state(self.module, self.optimizer)
        if run.is_main:
            output = Path(config.output_dir)
            save_final(weights)
            plot_curves(self.log.records(), self.plot_keys,
                        output / f"{self.name.lower()}_curves.png", self.title)
            remove_stale_temps(output)
        return self.log.records()

    def save_checkpoint(self, **extra: Any) -> Path | None:
        """Write checkpoint-<step>.pt atomically (main process), with the trainer's
        `extra` state, then delete the oldest beyond save_total_limit; returns its path.

        Every process must call it (under FSDP2 the weights are gathered from all)."""
        path = checkpoint_path(self.config.output_dir, self.step)
        weights, optimizer = gather_training_state(self.module, self.optimizer)
        rng = gather_rng_states(self.run)
        if not self.run.is_main:
            return None
        save_atomic({
            "step": self.step,
            self.key: weights,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "window": self.window.sums,
            **extra,
            "frozen_models": self.frozen_models,
            "rng": rng,
            "config": asdict(self.config),
        }, path)
        prune_checkpoints(path, self.config.save_total_limit)
        return path

    def _load(self, path: Path, state: dict[str, Any]) -> None:
        check_same_frozen_models(state.get("frozen_models"), self.frozen_models, path)
        if self.run.is_main:
            warn_changed_config(state.get("config"), asdict(self.config), path)
        configured_lrs = list(self.scheduler.base_lrs)  # the new config's, not the saved
        restore_training_state(self.module, self.optimizer, state[self.key],
                               state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        keep_configured_lrs(self.optimizer, self.scheduler, configured_lrs)
        self.step = state["step"]
        self.window = MetricsWindow(state.get("window"))  # older checkpoints have none
        restore_rng_states(state["rng"], self.run)
