"""The trainers' data: records from a list, a JSONL file or a `datasets.Dataset`, and
the rows of each batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlhf_fast.trainers.run import Run


def example_indices(num_examples: int, batch_size: int, run: Run, seed: int,
                    batch: int) -> list[int]:
    """The dataset rows of this rank's `batch`-th batch of the run (0-based).

    Each epoch is a permutation drawn from (seed, epoch); incomplete global batches at
    an epoch's end are dropped. A pure function of `batch`, so resuming at a step replays
    exactly the rows an uninterrupted run would have seen.
    """
    global_batch = batch_size * run.world
    per_epoch = num_examples // global_batch
    epoch, position = divmod(batch, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
    start = (position * run.world + run.rank) * batch_size
    return order[start:start + batch_size].tolist()


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def load_records(data: Any, fields: tuple[str, ...], name: str) -> list[dict[str, Any]]:
    """Records with string `fields` from a list of dicts, a JSONL path or a
    `datasets.Dataset`; a clear error naming `name` for anything else."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no file at {path}")
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{name}: {path} line {number} is not JSON: {exc}") from exc
    elif hasattr(data, "column_names") and hasattr(data, "__getitem__"):  # datasets.Dataset
        records = [data[i] for i in range(len(data))]
    else:
        records = list(data)
    if not records:
        raise ValueError(f"{name} is empty; expected records with fields {list(fields)}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{name}[{index}] must be a dict with fields {list(fields)}, "
                             f"got {type(record).__name__}")
        for field in fields:
            if not isinstance(record.get(field), str):
                raise ValueError(f"{name}[{index}] needs a string field {field!r}, got "
                                 f"{record.get(field)!r}")
    return records


def load_prompts(prompts: Any) -> list[str]:
    """Prompt strings from a list of strings or of {"prompt"} records, a JSONL file of
    records, a text file of one prompt per line, or a `datasets.Dataset`."""
    if isinstance(prompts, (str, Path)) and not str(prompts).endswith(".jsonl"):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts: no file at {path}")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    if isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
        prompts = [{"prompt": p} for p in prompts]
    return [record["prompt"] for record in load_records(prompts, ("prompt",), "prompts")]
