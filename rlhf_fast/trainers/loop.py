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
- checkpoints every save_steps steps and at the last, checkpoint-<step>/ folders (the
  trained models as transformers folders, optimizer, LR schedule, logging window, the
  trainer's extra state, the frozen models' identities, every process's random streams,
  the config; `rlhf_fast.trainers.checkpoints`), and resuming from one;
- the final model (saved by the trainer's `save_final`), the plot of the curves, and
  the removal of temp files a killed save left behind.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rlhf_fast.trainers.checkpoints import (
    DCP_FOLDER,
    Export,
    check_no_checkpoints,
    check_same_frozen_models,
    checkpoint_path,
    load_resume_checkpoint,
    prune_checkpoints,
    restore_weights,
    write_checkpoint,
)
from rlhf_fast.trainers.config import TrainerConfig
from rlhf_fast.trainers.files import (
    publish_folder,
    remove_stale_temps,
    reporting_a_full_disk,
    temp_folder,
)
from rlhf_fast.trainers.metrics import MetricsLog, MetricsWindow, plot_curves, progress_bar
from rlhf_fast.trainers.model_state import (
    gather_model_state,
    load_sharded_state,
    restore_training_state,
    save_sharded_state,
)
from rlhf_fast.trainers.resume import keep_configured_lrs, remove_checkpoints, warn_changed_config
from rlhf_fast.trainers.run import (
    Run,
    gather_rng_states,
    is_fsdp2_sharded,
    restore_rng_states,
    seed_process,
    setup_run,
)
from rlhf_fast.trainers.trackers import Trackers


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


def lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainerConfig,
                 training_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """config.lr_scheduler_type over the run's `training_steps` optimizer steps, after
    the warm-up (`TrainerConfig.num_warmup_steps`), as transformers builds it.

    The schedule depends on training_steps: a run cut short and resumed follows the same
    curve as an uninterrupted one only with the same max_steps (or a constant schedule).
    """
    from transformers import get_scheduler

    return get_scheduler(config.lr_scheduler_type, optimizer,
                         num_warmup_steps=config.num_warmup_steps(training_steps),
                         num_training_steps=training_steps)


class Loop:
    """A trainer's step count, optimizer schedule, logging window, log and checkpoints.

    Args:
        config, run: the trainer's config and `start_run`'s run.
        optimizer: the trainer's optimizer (its LR schedule: `lr_scheduler`).
        training_steps: the run's optimizer steps in all, which the LR schedule spans
            (PPO: several per iteration).
        module: the trained module whose state checkpoints hold (not a DDP wrapper).
        exports: the transformers folders a checkpoint holds the module's weights in
            (`Export`: the policy in the checkpoint folder itself, PPO's critic in
            value_model/); together they must hold every weight of `module`.
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
                 module: nn.Module, exports: list[Export], frozen_models: dict[str, Any], *,
                 training_steps: int, name: str, title: str, plot_keys: list[str],
                 rank_means: bool = True,
                 restore: Callable[[dict[str, Any]], None] | None = None):
        self.config, self.run, self.optimizer = config, run, optimizer
        self.module, self.exports, self.frozen_models = module, exports, frozen_models
        self.name, self.title, self.plot_keys = name, title, plot_keys
        self.rank_means = rank_means
        self.training_steps = training_steps
        self.scheduler = lr_scheduler(optimizer, config, training_steps)
        self.step = 0
        self.window = MetricsWindow()
        if config.resume_from is not None:
            path, state = load_resume_checkpoint(config.resume_from, config.output_dir)
            self._load(path, state)
            if restore is not None:
                restore(state["extra"])
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
        trackers = Trackers(config, run.is_main)
        try:
            self._train_steps(total_steps, step, bar, trackers, save_checkpoint, evaluate,
                              eval_steps)
        finally:
            trackers.finish()
        bar.close()
        weights = gather_model_state(self.module)
        if run.is_main:
            output = Path(config.output_dir)
            save_final(weights)
            plot_curves(self.log.records(), self.plot_keys,
                        output / f"{self.name.lower()}_curves.png", self.title)
            remove_stale_temps(output)
        return self.log.records()

    def _train_steps(self, total_steps: int, step: Callable[[], tuple[float, float]],
                     bar: Any, trackers: Trackers, save_checkpoint: Callable[[], Any],
                     evaluate: Callable[[], dict[str, float]] | None,
                     eval_steps: int) -> None:
        """`train`'s loop: the steps, their logged rows, evaluations and checkpoints."""
        config, run = self.config, self.run

        def write(metrics: dict[str, float]) -> None:
            self.log.write(self.step, metrics, bar)
            trackers.log(self.step, metrics)

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
                metrics["tokens_per_s"] = run.sum_over_ranks(float(tokens)) / max(elapsed,
                                                                                1e-9)
                metrics.update(run.peak_memory())
                write(metrics)
                started, tokens = time.perf_counter(), 0
            if evaluate is not None and (last or (eval_steps and self.step % eval_steps == 0)):
                write(evaluate())
            if last or (config.save_steps and self.step % config.save_steps == 0):
                save_checkpoint()

    def save_checkpoint(self, **extra: Any) -> Path | None:
        """Write checkpoint-<step>/ atomically (a temp folder, renamed once whole), with
        the trainer's `extra` state (its tensors in safetensors, the rest JSON), then
        delete the oldest beyond save_total_limit; returns its path on the main process.

        Every process must call it: under FSDP2 each writes its shards of model and
        optimizer into dcp/ (and the transformers export gathers the model's weights,
        not the optimizer's state, from all)."""
        final = checkpoint_path(self.config.output_dir, self.step)
        sharded = is_fsdp2_sharded(self.module)
        rng = gather_rng_states(self.run)
        temp = self._shared_temp_folder(final)
        try:
            with reporting_a_full_disk(final):
                weights = optimizer = None
                if sharded:
                    save_sharded_state(self.module, self.optimizer, temp / DCP_FOLDER)
                    weights = gather_model_state(self.module)
                    if self.run.world > 1:
                        dist.barrier()  # every shard written before the rename
                elif self.run.is_main:
                    weights, optimizer = self.module.state_dict(), self.optimizer.state_dict()
                if not self.run.is_main:
                    return None
                write_checkpoint(temp, trainer_state=self._trainer_state(extra),
                                 weights=weights, exports=self.exports, optimizer=optimizer,
                                 scheduler=self.scheduler.state_dict(), rng=rng)
                publish_folder(temp, final)
        except BaseException:
            if self.run.is_main:
                shutil.rmtree(temp, ignore_errors=True)
            raise
        prune_checkpoints(final, self.config.save_total_limit)
        return final

    def _shared_temp_folder(self, final: Path) -> Path:
        """The main process's new temp folder for `final`, known to every process (they
        all write their shards into it under FSDP2)."""
        temp = [temp_folder(final) if self.run.is_main else None]
        if self.run.world > 1:
            dist.broadcast_object_list(temp, src=0)
        return Path(temp[0])

    def _trainer_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """What trainer_state.json (and .safetensors, for the tensors) hold. The data
        order is a function of the seed and the step: the step is its position."""
        return {"step": self.step, "window": self.window.state(), "extra": extra,
                "frozen_models": self.frozen_models, "config": asdict(self.config)}

    def _load(self, path: Path, state: dict[str, Any]) -> None:
        check_same_frozen_models(state.get("frozen_models"), self.frozen_models, path)
        if self.run.is_main:
            warn_changed_config(state.get("config"), asdict(self.config), path)
        configured_lrs = list(self.scheduler.base_lrs)  # the new config's, not the saved
        if state["dcp"] is not None:
            load_sharded_state(self.module, self.optimizer, state["dcp"])
        elif is_fsdp2_sharded(self.module):
            restore_training_state(self.module, self.optimizer, state["weights"],
                                   state["optimizer"])
        else:
            restore_weights(self.module, state["weights"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        keep_configured_lrs(self.optimizer, self.scheduler, configured_lrs)
        self.step = state["step"]
        self.window = MetricsWindow(state.get("window"))
        restore_rng_states(state["rng"], self.run)
