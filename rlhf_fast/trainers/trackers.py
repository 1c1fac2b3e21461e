"""Experiment trackers the logged rows also go to (`TrainerConfig.report_to`): TensorBoard,
Weights & Biases, Trackio. metrics.jsonl is always written; these are extra copies, on
the main process only.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

#: report_to's values: each tracker with the package it needs ("none": no tracker)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
REPORT_TO = (*TRACKER_PACKAGES, "none")
#: the project name given to wandb / trackio runs
PROJECT = "rlhf-fast"


def package_available(name: str) -> bool:
    """Whether `import name` would find a module (one put in sys.modules counts)."""
    if sys.modules.get(name) is not None:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_tracker_packages(report_to: list[str]) -> list[tuple[str, str]]:
    """(tracker, package) of each requested tracker whose package is not installed."""
    return [(name, TRACKER_PACKAGES[name]) for name in report_to
            if name in TRACKER_PACKAGES and not package_available(TRACKER_PACKAGES[name])]


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self) -> None: ...


class TensorBoardTracker:
    """Scalars to <output_dir>/runs through torch's SummaryWriter."""

    def __init__(self, output_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "runs"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged

    def finish(self) -> None:
        self.writer.close()


class ModuleTracker:
    """wandb or trackio: the same init / log / finish module functions."""

    def __init__(self, package: str, output_dir: str, config: dict[str, Any]):
        self.module = importlib.import_module(package)
        self.module.init(project=PROJECT, name=Path(output_dir).name, config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.module.log(dict(metrics), step=step)

    def finish(self) -> None:
        self.module.finish()


class Trackers:
    """The run's trackers (none off the main process): each logged row goes to all."""

    def __init__(self, config: Any, enabled: bool):
        self.trackers: list[Tracker] = []
        if not enabled:
            return
        for name in config.trackers:
            if name == "tensorboard":
                self.trackers.append(TensorBoardTracker(config.output_dir))
            elif name in TRACKER_PACKAGES:
                self.trackers.append(ModuleTracker(name, config.output_dir, asdict(config)))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
