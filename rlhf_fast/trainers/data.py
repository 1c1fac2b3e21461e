"""The trainers' data: the records of a source (`rlhf_fast.trainers.sources`: TRL's
dataset formats, loaded and checked) rendered as text, tokenised once (and cached), and
the rows of each batch.

Each text field is a string ("standard") or a list of {"role", "content"} messages
("conversational"), rendered with the tokenizer's chat template as TRL renders it; pairs
without a prompt field get their implicit prompt (the longest common prefix).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import torch
from datasets.fingerprint import Hasher

from rlhf_fast.trainers.run import Run
from rlhf_fast.trainers.sources import check_text, is_messages, load_source

#: bumped whenever the tokenised columns change meaning: older caches are then ignored
TOKENIZED_FORMAT = 1


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
