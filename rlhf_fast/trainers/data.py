"""The trainers' data: TRL's dataset formats from any source, tokenised once (and cached),
and the rows of each batch.

Formats (TRL's, https://huggingface.co/docs/trl/dataset_formats), per trainer kind:

- "pairs" (DPO and its relatives): {prompt, chosen, rejected}, or {chosen, rejected} with
  an implicit prompt (their longest common prefix);
- "kto" (unpaired preference): {prompt, completion, label (bool)};
- "prompts" (PPO / GRPO, prompt-only): {prompt}.

Each text field is a string ("standard") or a list of {"role", "content"} messages
("conversational"), rendered with the tokenizer's chat template as TRL renders it.

Sources: a list of dicts, a JSONL / JSON / parquet / CSV file, a `datasets.Dataset`, a
`datasets.DatasetDict` (a split of it), a folder written by `save_to_disk` or holding
data files, or a hub dataset id (`datasets.load_dataset`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.fingerprint import Hasher

from rlhf_fast.trainers.run import Run

#: the text fields of each kind's records (kto has a bool "label" too)
KIND_FIELDS = {"pairs": ("prompt", "chosen", "rejected"), "kto": ("prompt", "completion"),
               "prompts": ("prompt",)}
#: bumped whenever the tokenised columns change meaning: older caches are then ignored
TOKENIZED_FORMAT = 1
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


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


# --- chat templates and implicit prompts ------------------------------------------------


def common_prefix_length(first: str | list, second: str | list) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def split_implicit_prompt(chosen: str | list, rejected: str | list, name: str,
                          index: int) -> tuple[Any, Any, Any]:
    """(prompt, chosen answer, rejected answer) of a pair whose prompt is implicit: the
    longest common prefix (leading messages, or characters) that leaves each answer
    non-empty; a string prompt's trailing space goes to the answers (TRL's rule)."""
    if is_messages(chosen) != is_messages(rejected):
        raise ValueError(f"{name}[{index}]: fields 'chosen' and 'rejected' must both be "
                         "strings or both lists of messages")
    length = min(common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
    if isinstance(chosen, str) and length > 0 and chosen[length - 1] == " ":
        length -= 1
    if length <= 0:
        raise ValueError(f"{name}[{index}]: 'chosen' and 'rejected' share no prompt (no "
                         "common prefix) and the record has no field 'prompt'")
    return chosen[:length], chosen[length:], rejected[length:]


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], name: str, index: int,
                  field: str) -> str:
    """A conversational prompt as text: the generation prompt added after a user (or tool)
    turn, a final assistant turn continued instead (TRL's rule)."""
    last_role = messages[-1]["role"]
    if last_role not in ("user", "tool", "assistant"):
        raise ValueError(f"{name}[{index}]: field {field!r} must end with a user, tool or "
                         f"assistant message, got role {last_role!r}")
    continued = last_role == "assistant"
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=not continued,
                                         continue_final_message=continued)


def render_conversation(tokenizer: Any, record: dict[str, Any], answers: tuple[str, ...],
                        name: str, index: int) -> dict[str, str]:
    """A conversational record as text, as TRL's `apply_chat_template` renders it: the
    prompt with the generation prompt; each answer the template of prompt + answer minus
    the prompt's text, the prompt cut to what every rendering shares (templates that render
    the generation prompt differently from the start of an answer)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{name}[{index}]: field 'prompt' is a list of messages, but the "
                         "tokenizer has no chat_template to render it (set "
                         "tokenizer.chat_template, or pass strings)")
    prompt = render_prompt(tokenizer, record["prompt"], name, index, "prompt")
    full = {}
    for key in answers:
        full[key] = tokenizer.apply_chat_template(record["prompt"] + record[key],
                                                  tokenize=False)
        prompt = prompt[:common_prefix_length(prompt, full[key])]
    return {"prompt": prompt, **{key: full[key][len(prompt):] for key in answers}}


def record_as_text(record: dict[str, Any], kind: str, tokenizer: Any, name: str,
                   index: int) -> tuple[dict[str, str], bool]:
    """The record's prompt and answers as text, and whether a chat template rendered them
    (then they already hold the special tokens: none is added when tokenising)."""
    answers = {"pairs": ("chosen", "rejected"), "kto": ("completion",), "prompts": ()}[kind]
    if kind == "pairs" and (record.get("prompt") is None
                            or is_messages(record["chosen"]) and not is_messages(
                                record["prompt"])):
        prompt, chosen, rejected = split_implicit_prompt(record["chosen"], record["rejected"],
                                                         name, index)
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    fields = ("prompt", *answers)
    for field in fields:
        check_text(record.get(field), name, index, field)
    conversational = [is_messages(record[field]) for field in fields]
    if not any(conversational):
        return {field: record[field] for field in fields}, False
    if not all(conversational):
        raise ValueError(f"{name}[{index}]: fields {list(fields)} must be all strings or all "
                         "lists of messages")
    if not answers:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{name}[{index}]: field 'prompt' is a list of messages, but the "
                             "tokenizer has no chat_template to render it")
        return {"prompt": render_prompt(tokenizer, record["prompt"], name, index,
                                        "prompt")}, True
    return render_conversation(tokenizer, record, answers, name, index), True


# --- tokenising ---------------------------------------------------------------------------


def tokenize_batch(batch: dict[str, list[Any]], indices: list[int], *, kind: str,
                   tokenizer: Any, name: str) -> dict[str, list[Any]]:
    """`Dataset.map(batched=True)`'s function: each record's "prompt_ids" (all of them:
    max_prompt_length cuts later, so the cache serves every length) and each answer's ids
    ("chosen_ids" and "rejected_ids", or "completion_ids"); kto keeps "label", prompts keep
    "prompt_text" (what reward functions read).

    A string prompt is tokenised with the tokenizer's special tokens, a string answer
    without them and followed by EOS (as the trainers always did); rendered
    conversations hold their special tokens already: no more are added (TRL's rule).
    """
    fields = list(batch)
    rows = [dict(zip(fields, values)) for values in zip(*batch.values())]
    texts, rendered = [], []
    for row, index in zip(rows, indices):
        text, is_rendered = record_as_text(row, kind, tokenizer, name, index)
        texts.append(text)
        rendered.append(is_rendered)
    out: dict[str, list[Any]] = {
        "prompt_ids": tokenized(tokenizer, [t["prompt"] for t in texts], rendered,
                                add_special_tokens=True)}
    for key in [k for k in texts[0] if k != "prompt"]:
        ids = tokenized(tokenizer, [t[key] for t in texts], rendered, add_special_tokens=False)
        out[f"{key}_ids"] = [i if r else i + [tokenizer.eos_token_id]
                             for i, r in zip(ids, rendered)]
    if kind == "kto":
        out["label"] = batch["label"]
    if kind == "prompts":
        out["prompt_text"] = [t["prompt"] for t in texts]
    return out


def tokenized(tokenizer: Any, texts: list[str], rendered: list[bool],
              add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text, in one batched call per kind of text (rendered texts never
    get special tokens added)."""
    ids: list[list[int]] = [[] for _ in texts]
    for is_rendered in (False, True):
        rows = [i for i, r in enumerate(rendered) if r == is_rendered]
        if rows:
            encoded = tokenizer([texts[i] for i in rows],
                                add_special_tokens=add_special_tokens and not is_rendered)
            for row, row_ids in zip(rows, encoded["input_ids"]):
                ids[row] = row_ids
    return ids


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides the token ids: the tokenizer's vocabulary and rules, special tokens
    and chat template (a fast tokenizer's JSON; else the whole object, pickled)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None),
             getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token", None),
             backend.to_str() if backend is not None else Hasher.hash(tokenizer)]
    return Hasher.hash(parts)


def tokenize_dataset(dataset: datasets.Dataset, kind: str, tokenizer: Any,
                     name: str) -> datasets.Dataset:
    """`dataset` tokenised by `tokenize_batch`, batched. A dataset backed by files (a
    data file through `datasets`, a saved folder, a hub id) gets its result cached next to
    its Arrow files, under a fingerprint of the source's fingerprint and the tokenizer:
    the same file and tokenizer reuse it at the next start."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer needs an eos_token_id (it ends every answer)")
    fingerprint = Hasher.hash([dataset._fingerprint, kind, TOKENIZED_FORMAT,
                               tokenizer_fingerprint(tokenizer)])
    return dataset.map(tokenize_batch, batched=True, batch_size=1000, with_indices=True,
                       fn_kwargs={"kind": kind, "tokenizer": tokenizer, "name": name},
                       remove_columns=dataset.column_names, new_fingerprint=fingerprint,
                       desc=f"Tokenizing {name}")


def int_lists(dataset: datasets.Dataset, column: str) -> list[list[int]]:
    """A column of token-id lists as Python lists: one flat conversion of the Arrow values,
    then slices by the offsets (several times faster than row-by-row `to_pylist`)."""
    array = dataset.with_format("arrow")[column]
    array = array.combine_chunks() if hasattr(array, "combine_chunks") else array
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy().tolist()
    return [values[start:end] for start, end in zip(offsets[:-1].tolist(),
                                                      offsets[1:].tolist())]


def truncated_pairs(prompts: list[list[int]], chosen: list[list[int]],
                    rejected: list[list[int]], max_prompt_length: int, max_length: int,
                    name: str) -> list[dict[str, list[int]]]:
    """Each pair's prompt (its last max_prompt_length tokens) and answers cut so prompt +
    answer fits max_length."""
    pairs = []
    for index, (prompt, first, second) in enumerate(zip(prompts, chosen, rejected)):
        prompt = prompt[-max_prompt_length:]
        if not prompt:
            raise ValueError(f"{name}[{index}]: the prompt is empty after tokenising "
                             "(the first answer token would have nothing to condition on)")
        room = max_length - len(prompt)
        pairs.append({"prompt": prompt, "chosen": first[:room], "rejected": second[:room]})
    return pairs


def tokenized_pairs(data: Any, tokenizer: Any, *, max_prompt_length: int, max_length: int,
                    name: str, kind: str = "pairs", split: str = "train"
                    ) -> tuple[list[dict[str, list[int]]], torch.Tensor | None]:
    """The token ids of a preference source, as pairs {prompt, chosen, rejected} (lists
    of ints), and for kto the records' labels [n] (bool; else None).

    kto pairs each record's completion (as "chosen") with the next record's (as
    "rejected"): the mismatched prompt / completion of its KL estimate.
    """
    dataset = tokenize_dataset(load_source(data, kind, name, split), kind, tokenizer, name)
    prompts = int_lists(dataset, "prompt_ids")
    if kind != "kto":
        return truncated_pairs(prompts, int_lists(dataset, "chosen_ids"),
                               int_lists(dataset, "rejected_ids"), max_prompt_length,
                               max_length, name), None
    completions = int_lists(dataset, "completion_ids")
    mismatched = completions[1:] + completions[:1]
    return (truncated_pairs(prompts, completions, mismatched, max_prompt_length, max_length,
                            name), torch.tensor(dataset["label"]))


def tokenized_prompts(data: Any, tokenizer: Any, *, max_prompt_length: int, name: str,
                      split: str = "train") -> tuple[list[dict[str, Any]], list[list[int]]]:
    """The records of a prompt-only source and each prompt's token ids (the last
    max_prompt_length). A record keeps the source's columns as they are (TRL-style reward
    functions get them, the prompt as given: a string or a list of messages) and adds
    "prompt_text", the text the model sees (a conversation rendered with the generation
    prompt)."""
    dataset = load_source(data, "prompts", name, split)
    columns = tokenize_dataset(dataset, "prompts", tokenizer, name).to_dict()
    ids = [prompt[-max_prompt_length:] for prompt in columns["prompt_ids"]]
    empty = [i for i, prompt in enumerate(ids) if not prompt]
    if empty:
        raise ValueError(f"{name}[{empty[0]}] is empty after tokenising")
    records = [dict(row, prompt_text=text)
               for row, text in zip(dataset.to_list(), columns["prompt_text"])]
    return records, ids

