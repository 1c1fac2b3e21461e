"""The trainers' data sources, loaded and checked: TRL's dataset formats
(https://huggingface.co/docs/trl/dataset_formats) from any source, as a `datasets.Dataset`.
`rlhf_fast.trainers.data` renders and tokenises what this loads.

Formats, per trainer kind:

- "pairs" (DPO and its relatives): {prompt, chosen, rejected}, or {chosen, rejected} with
  an implicit prompt (their longest common prefix);
- "kto" (unpaired preference): {prompt, completion, label (bool)};
- "prompts" (PPO / GRPO, prompt-only): {prompt}.

Each text field is a string ("standard") or a list of {"role", "content"} messages
("conversational").

Sources: a list of dicts, a JSONL / JSON / parquet / CSV file, a `datasets.Dataset`, a
`datasets.DatasetDict` (a split of it), a folder written by `save_to_disk` or holding
data files, or a hub dataset id (`datasets.load_dataset`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

#: the text fields of each kind's records (kto has a bool "label" too)
KIND_FIELDS = {"pairs": ("prompt", "chosen", "rejected"), "kto": ("prompt", "completion"),
               "prompts": ("prompt",)}
#: the data files read through `datasets`, by suffix: the builder that reads them
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

# --- sources ------------------------------------------------------------------------------


def load_source(data: Any, kind: str, name: str, split: str = "train") -> datasets.Dataset:
    """`data` as a checked `datasets.Dataset` of `kind`'s records ("pairs", "kto",
    "prompts"); `split` picks the split of a DatasetDict, a saved dataset folder, a folder
    of data files or a hub id (a single file is one split). Errors name `name`."""
    if isinstance(data, datasets.DatasetDict):
        dataset = pick_split(data, split, name)
    elif isinstance(data, datasets.Dataset):
        dataset = data
    elif isinstance(data, (str, Path)):
        dataset = load_path_or_id(data, kind, name, split)
    elif hasattr(data, "column_names") and hasattr(data, "__getitem__"):  # dataset-like
        dataset = dataset_from_records([data[i] for i in range(len(data))], kind, name)
    else:
        dataset = dataset_from_records(list(data), kind, name)
    check_columns(dataset, kind, name)
    return dataset


def has_splits(data: Any) -> bool:
    """Whether `data` is a source that can hold several splits: a DatasetDict, a folder
    (not one saved Dataset) or a hub id."""
    if isinstance(data, datasets.DatasetDict):
        return True
    if not isinstance(data, (str, Path)):
        return False
    path = Path(data).expanduser()
    return not path.is_file() and not (path / "state.json").is_file()


def pick_split(splits: datasets.DatasetDict, split: str, name: str) -> datasets.Dataset:
    if split not in splits:
        raise ValueError(f"{name} has no split {split!r}; its splits: {list(splits)}")
    return splits[split]


def load_path_or_id(data: str | Path, kind: str, name: str, split: str) -> datasets.Dataset:
    """A data file, a dataset folder, or else a hub dataset id."""
    path = Path(data).expanduser()
    if path.is_file():
        return load_file(path, kind, name)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            saved = datasets.load_from_disk(str(path))  # written by save_to_disk
            return pick_split(saved, split, name) if isinstance(saved, datasets.DatasetDict) \
                else saved
        return load_with_datasets(name, str(path), split=split)
    text = str(data)
    if isinstance(data, Path) or path.suffix or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: no file at {path}")
    return load_with_datasets(name, text, split=split)


def load_with_datasets(name: str, *args: Any, **kwargs: Any) -> datasets.Dataset:
    """`datasets.load_dataset(*args, **kwargs)`; its failure (no such hub id, no network,
    no such split, ...) as a ValueError naming `name`, not a traceback from deep inside."""
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 (datasets raises many types; all mean "cannot")
        raise ValueError(f"{name}: {args[0]!r} is not a local file or folder, and "
                         f"datasets.load_dataset could not load it: {type(exc).__name__}: "
                         f"{exc}") from exc


def load_file(path: Path, kind: str, name: str) -> datasets.Dataset:
    """A data file: through `datasets` (memory-mapped Arrow, cached, so the tokenised
    columns can be cached too) by its suffix; a prompts text file (one per line) or a
    JSONL file of another suffix read here."""
    builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        if kind == "prompts":
            lines = path.read_text(encoding="utf-8").splitlines()
            return dataset_from_records([{"prompt": line} for line in lines if line.strip()],
                                        kind, name)
        return dataset_from_records(read_json_records(path, name), kind, name)
    if builder == "json" and not path.read_text(encoding="utf-8").strip():
        raise ValueError(f"{name} is empty; expected records with fields "
                         f"{list(KIND_FIELDS[kind])}")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001
        if builder != "json":
            raise ValueError(f"{name}: cannot read {path}: {exc}") from exc
        # a line that is not JSON, or fields of mixed types: find it, for a precise error
        check_records(read_json_records(path, name), kind, name)
        raise ValueError(f"{name}: cannot read {path}: {exc}") from exc


def read_json_records(path: Path, name: str) -> list[Any]:
    """The records of a JSON array file or a JSONL file (blank lines skipped)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}: {path} is not JSON: {exc}") from exc
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{name}: {path} line {number} is not JSON: {exc}") from exc
    return records


def dataset_from_records(records: list[Any], kind: str, name: str) -> datasets.Dataset:
    """An in-memory Dataset of checked records (prompt strings become {"prompt"})."""
    if kind == "prompts":
        records = [{"prompt": r} if isinstance(r, str) else r for r in records]
    check_records(records, kind, name)
    return datasets.Dataset.from_list(records)


# --- checks -------------------------------------------------------------------------------


def is_messages(value: Any) -> bool:
    """A conversation: a non-empty list of {"role", "content"} dicts with string values."""
    return (isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in value))


def needed_fields(kind: str, has_prompt: bool) -> tuple[str, ...]:
    """The text fields a record must hold: pairs without a prompt field are implicit-prompt
    pairs (TRL's rule: decided for the whole dataset, by its columns)."""
    fields = KIND_FIELDS[kind]
    return fields if has_prompt or kind != "pairs" else fields[1:]


def check_records(records: list[Any], kind: str, name: str) -> None:
    """Each record a dict whose text fields are strings or lists of messages (kto: and a
    bool label); errors name the record's index and the field."""
    if not records:
        raise ValueError(f"{name} is empty; expected records with fields "
                         f"{list(KIND_FIELDS[kind])}")
    has_prompt = any(isinstance(r, dict) and "prompt" in r for r in records)
    fields = needed_fields(kind, has_prompt)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{name}[{index}] must be a dict with fields {list(fields)}, "
                             f"got {type(record).__name__}")
        for field in fields:
            check_text(record.get(field), name, index, field)
        if kind == "kto":
            check_label(record.get("label"), name, index)


def check_text(value: Any, name: str, index: int, field: str) -> None:
    if isinstance(value, str) or is_messages(value):
        return
    if value is None:
        raise ValueError(f"{name}[{index}] needs a string field {field!r}, got None (or a "
                         "list of {'role', 'content'} messages)")
    if isinstance(value, list):
        raise ValueError(f"{name}[{index}]: field {field!r} must be a string or a non-empty "
                         "list of messages {'role': str, 'content': str}, got "
                         f"{str(value)[:200]}")
    raise ValueError(f"{name}[{index}]: field {field!r} must be a string or a list of "
                     f"messages, got {type(value).__name__}")


def check_label(value: Any, name: str, index: int) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}[{index}] needs a bool field 'label' (desirable or not), "
                         f"got {value!r}")


def check_columns(dataset: datasets.Dataset, kind: str, name: str) -> None:
    """The dataset's columns hold `kind`'s fields: checked on the Arrow schema and null
    counts (no pass over the rows in Python); the rows' messages are checked as they are
    tokenised."""
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty; expected records with fields "
                         f"{list(KIND_FIELDS[kind])}")
    columns = dataset.column_names
    for field in needed_fields(kind, "prompt" in columns):
        if field not in columns:
            raise ValueError(f"{name}[0] needs a string field {field!r}, got None (or a list "
                             "of {'role', 'content'} messages)")
        feature = dataset.features[field]
        if is_string_feature(feature) or is_messages_feature(feature):
            check_no_nulls(dataset, field, name)
        else:  # another type, or mixed types (datasets' Json): check row by row
            for index, value in enumerate(dataset[field]):
                check_text(value, name, index, field)
    if kind == "kto":
        feature = dataset.features.get("label")
        if isinstance(feature, datasets.Value) and feature.dtype == "bool":
            check_no_nulls(dataset, "label", name)
        else:
            labels = dataset["label"] if feature is not None else [None]
            for index, value in enumerate(labels):
                check_label(value, name, index)


def is_string_feature(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def is_messages_feature(feature: Any) -> bool:
    item = getattr(feature, "feature", None)  # List / LargeList / Sequence of structs
    return (isinstance(item, dict) and is_string_feature(item.get("role"))
            and is_string_feature(item.get("content")))


def check_no_nulls(dataset: datasets.Dataset, field: str, name: str) -> None:
    column = dataset.data.column(field)
    if column.null_count:
        index = column.is_null().to_pylist().index(True)
        raise ValueError(f"{name}[{index}] needs a "
                         f"{'bool' if field == 'label' else 'string'} field {field!r}, got None")
