"""Metrics: the logging window (the mean since the last row), the main process's log
(stdout above the progress bar and a JSONL file), the progress bar and the PNG plot.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rlhf_fast.trainers.files import replace_atomic


def host_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar metric tensors as floats, in one device-to-host copy (one sync, not one
    per metric)."""
    values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()])
    return dict(zip(metrics, values.tolist()))


class MetricsLog:
    """Metrics of the main process to stdout (above the progress bar) and a JSONL file.

    resume_step: None starts the file afresh; a resumed run passes its checkpoint's step,
    and the rows logged after it (by the interrupted run, which the resumed run logs
    again) are dropped.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                path.write_text("")
            elif path.exists():
                self._keep_through(resume_step)

    def _keep_through(self, step: int) -> None:
        """Rewrite the file (atomically: a crash keeps the old one) with the rows of
        steps <= step; a line cut short by a crash mid-write is dropped too."""
        kept = []
        for line in self.path.read_text().splitlines():
            record = _json_or_none(line)
            if isinstance(record, dict) and record.get("step", math.inf) <= step:
                kept.append(line + "\n")
        replace_atomic(self.path, lambda f: f.write("".join(kept).encode()))

    def write(self, step: int, metrics: dict[str, float], progress: Any = None) -> None:
        """Append a row; a non-finite value is written as null (NaN and Infinity are not
        JSON, and would break every reader of the file) and shown as nan / inf."""
        if not self.enabled:
            return
        values = {"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}}
        record = {k: v if math.isfinite(v) else None for k, v in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        shown = "  ".join(f"{k}={_short(v)}" for k, v in values.items())
        (progress.write if progress is not None else print)(shown)

    def records(self) -> list[dict[str, float]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


class MetricsWindow:
    """The metrics of the steps since the last logged row, which is their weighted mean.

    A step's metrics may be tensors on the device: they are summed there and read back
    once, when the row is logged, so a training step waits for nothing on the host.
    `state` (a plain dict of floats) goes into checkpoints, so that a resumed run logs
    the same rows as an uninterrupted one.
    """

    def __init__(self, sums: dict[str, float] | None = None):
        self.sums: dict[str, float | torch.Tensor] = dict(sums or {})

    def add(self, metrics: Mapping[str, float | torch.Tensor], weight: float = 1.0) -> None:
        self.sums["_count"] = self.sums.get("_count", 0.0) + weight
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().reshape(())
            self.sums[key] = self.sums.get(key, 0.0) + weight * value

    def state(self) -> dict[str, float]:
        """The sums as floats (one device-to-host copy)."""
        tensors = {k: v for k, v in self.sums.items() if isinstance(v, torch.Tensor)}
        return {**self.sums, **(host_floats(tensors) if tensors else {})}

    def flush(self) -> dict[str, float]:
        """The mean of the window, which starts afresh."""
        sums, self.sums = self.state(), {}
        count = sums.pop("_count", 1.0)
        return {key: value / count for key, value in sums.items()}


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _short(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def plot_curves(records: list[dict[str, float]], keys: list[str], path: Path,
                title: str) -> Path | None:
    """A PNG of each metric in `keys` against the step; None (and a notice) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'rlhf-fast[plot]')")
        return None
    keys = [k for k in keys if any(r.get(k) is not None for r in records)]
    if not keys:
        return None
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows),
                                squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot(*zip(*points), marker="." if len(points) < 40 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    """A tqdm bar on the main process (tqdm ships with transformers' hub client)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc,
                dynamic_ncols=True, file=sys.stdout)
