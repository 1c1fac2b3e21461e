"""What a resumed run changes from the run it continues: the config fields that differ
(warned about, old -> new), the learning rates the new config sets (honoured, where the
restored LR schedule would keep the old ones), and a fresh run's overwriting of an
earlier run's checkpoints (`overwrite_output_dir`)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from rlhf_fast.trainers.checkpoints import checkpoints_by_step

#: Fields that say how a run starts, not how it trains: they differ on every resume.
START_FIELDS = ("resume_from", "overwrite_output_dir")


def changed_fields(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields whose value differs between a checkpoint's saved config and the
    current one: {field: (old, new)}. Fields one of them lacks (a checkpoint of an older
    version has no newer fields) and `START_FIELDS` are left out."""
    return {name: (saved[name], value) for name, value in current.items()
            if name in saved and name not in START_FIELDS and saved[name] != value}


def warn_changed_config(saved: dict[str, Any] | None, current: dict[str, Any],
                        path: Path | str) -> dict[str, tuple[Any, Any]]:
    """Warn, naming each field old -> new, when the resumed checkpoint at `path` was
    written under another config; returns the changes."""
    changes = changed_fields(saved or {}, current)
    if changes:
        listed = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changes.items())
        warnings.warn(f"resuming from {path} with a config that differs from its run's: "
                      f"{listed} (the new values apply from here on)", stacklevel=3)
    return changes


def keep_configured_lrs(optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LambdaLR,
                        configured: list[float]) -> None:
    """After a checkpoint's optimizer and LR schedule are restored, make the schedule's
    peak learning rates the current config's (`configured`, each param group's, read
    before the restore): the restored state holds the old run's, and a new --lr would
    otherwise be ignored. The schedule's position (warm-up) is kept."""
    scheduler.base_lrs = list(configured)
    for group, lr, factor in zip(optimizer.param_groups, configured, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def remove_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete the checkpoint-<step>/ folders of `output_dir` (overwrite_output_dir);
    returns them. Every process may call it: a folder another removed first is skipped."""
    found = checkpoints_by_step(output_dir)
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found
