"""Checkpoints: the checkpoint-<step>/ folders of an output_dir (writing, finding,
pruning and safely loading them, restoring their weights), and the check on resume that
the frozen models a checkpoint does not hold are the run's. The state they hold (a
module's full or DCP-sharded state, its peft adapter, a frozen model's identity) is
`rlhf_fast.trainers.model_state`'s.

A checkpoint folder holds (`write_checkpoint`)::

    checkpoint-<step>/
        config.json, model.safetensors, tokenizer files   the policy (save_pretrained)
          or adapter_config.json, adapter_model.safetensors  its adapter, for a peft
                                                          (LoRA) policy: the frozen base
                                                          is not saved, but recorded
        value_model/                                      PPO's critic, when it has one
        optimizer.pt, scheduler.pt, rng_state_<rank>.pth  torch.save, read weights_only
        trainer_state.json                                step, config, frozen models, ...
        trainer_state.safetensors                         the trainer's extra tensors
        dcp/                                              under FSDP2: sharded model and
                                                          optimizer (no optimizer.pt)

Nothing is read back by unpickling arbitrary objects: torch files by the weights_only
unpickler, DCP's metadata by `model_state.DCPMetadataUnpickler`.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_fast.trainers.files import save_safetensors
from rlhf_fast.trainers.model_state import (
    DEFAULT_ADAPTER,
    check_single_adapter,
    is_peft_model,
    strip_prefix,
)

#: checkpoint-<step> folders: a number after the dash, nothing else
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = re.compile(r"rng_state_(\d+)\.pth")
DCP_FOLDER = "dcp"
#: bumped when the layout changes incompatibly
FORMAT_VERSION = 1


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def checkpoints_by_step(output_dir: str | Path) -> list[Path]:
    """The checkpoint-<step> folders of output_dir, oldest step first. A folder of that
    name is complete: it is written under a temp name and renamed once whole."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if checkpoint_step(p) is not None and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def prune_checkpoints(written: Path, keep: int) -> list[Path]:
    """Delete the oldest checkpoints beside `written` (just saved) so that at most `keep`
    remain; `written` itself is never deleted, nor anything when keep is 0. Returns the
    deleted paths. Call it only once `written` is safely on disk."""
    if keep <= 0:
        return []
    others = [p for p in checkpoints_by_step(written.parent) if p != written]
    doomed = others[: max(0, len(others) - (keep - 1))]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def resolve_checkpoint(resume_from: str, output_dir: str | Path) -> Path:
    """`resume_from` as a checkpoint folder, or "latest": the newest in output_dir."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_dir():
            raise FileNotFoundError(f"resume_from: no checkpoint folder at {path}")
        return path
    found = checkpoints_by_step(output_dir)
    if not found:
        raise FileNotFoundError(f"resume_from='latest': no checkpoint-<step> folder in "
                                f"{output_dir}")
    return found[-1]


def check_no_checkpoints(output_dir: str | Path) -> None:
    """Refuse to start a run afresh in a folder holding checkpoints: after a crash,
    resume_from="latest" would pick the newest checkpoint there, maybe an earlier run's."""
    found = checkpoints_by_step(output_dir)
    if found:
        raise ValueError(
            f"output_dir {str(output_dir)!r} already holds {len(found)} checkpoint(s) of an "
            f"earlier run (newest: {found[-1].name}); pass resume_from (\"latest\" or a "
            "checkpoint folder) to continue it, or choose an empty output_dir"
        )


class UnreadableCheckpoint(ValueError):
    """A checkpoint that cannot be read: cut short, or not a checkpoint at all."""


# --- writing -----------------------------------------------------------------------------


#: the file stem of the adapter a peft model's save_pretrained writes
ADAPTER_WEIGHTS = "adapter_model"


@dataclass
class Export:
    """A model a checkpoint holds as a transformers folder: the trained module's weights
    under `prefix`, saved by `model.save_pretrained` (safetensors) into `folder` of the
    checkpoint ("": the checkpoint folder itself, so that from_pretrained reads it).

    A peft model (LoRA) saves its adapter only (adapter_config.json and
    adapter_model.safetensors, which ``PeftModel.from_pretrained(base, folder)`` reads),
    keyed as peft keys it: `restore_weights` loads it back by peft's own inverse."""

    folder: str
    prefix: str
    model: nn.Module
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if is_peft_model(self.model):
            check_single_adapter(self.model)

    @property
    def adapter(self) -> bool:
        return is_peft_model(self.model)

    def weight_files(self) -> dict[str, str]:
        """The safetensors files it writes, by stem: the prefix of their keys in the
        trained module's state dict (a `ValueModel` writes its head beside the backbone;
        a peft model its adapter, whose keys are peft's, not the module's)."""
        if self.adapter:
            return {ADAPTER_WEIGHTS: self.prefix}
        own = getattr(self.model, "WEIGHT_FILES", {"model": ""})
        return {stem: self.prefix + prefix for stem, prefix in own.items()}

    def save(self, checkpoint: Path, weights: dict[str, torch.Tensor]) -> None:
        directory = checkpoint / self.folder
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, state_dict=strip_prefix(weights, self.prefix),
                                   safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)


def split_tensors(value: Any, key: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """`value` without its tensors (a nested dict keeps its keys), and those tensors by
    their "/"-joined keys: the JSON and the safetensors parts of a trainer's state."""
    if torch.is_tensor(value):
        return None, {key: value.detach().cpu().contiguous()}
    if isinstance(value, dict):
        plain, tensors = {}, {}
        for name, item in value.items():
            item_plain, item_tensors = split_tensors(item, f"{key}/{name}" if key else name)
            tensors.update(item_tensors)
            if not torch.is_tensor(item):
                plain[name] = item_plain
        return plain, tensors
    return value, {}


def join_tensors(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The inverse of `split_tensors`."""
    for key, tensor in tensors.items():
        *parents, name = key.split("/")
        target = plain
        for parent in parents:
            target = target.setdefault(parent, {})
        target[name] = tensor
    return plain


def write_checkpoint(directory: Path, *, trainer_state: dict[str, Any],
                     weights: dict[str, torch.Tensor] | None, exports: list[Export],
                     optimizer: dict[str, Any] | None, scheduler: dict[str, Any],
                     rng: list[dict[str, Any]]) -> None:
    """Write a checkpoint's files into `directory` (a temp folder, renamed once whole).

    trainer_state: step, config, ... and the trainer's extra state; its tensors go to
    trainer_state.safetensors, the rest to trainer_state.json. weights: the trained
    module's full state dict, written by `exports` (None: not exported). optimizer:
    its state dict (None: it is in dcp/).
    """
    if weights is not None:
        for export in exports:
            export.save(directory, weights)
    if optimizer is not None:
        torch.save(optimizer, directory / OPTIMIZER_FILE)
    torch.save(scheduler, directory / SCHEDULER_FILE)
    for rank, state in enumerate(rng):
        torch.save(state, directory / f"rng_state_{rank}.pth")
    plain, tensors = split_tensors(trainer_state)
    save_safetensors(tensors, directory / TRAINER_TENSORS)
    plain["format_version"] = FORMAT_VERSION
    plain["exports"] = [] if weights is None else [
        {"folder": e.folder, "files": e.weight_files(), "adapter": e.adapter}
        for e in exports]
    (directory / TRAINER_STATE).write_text(json.dumps(plain, indent=2, default=str) + "\n")


# --- reading -----------------------------------------------------------------------------


def load_torch_file(path: Path) -> Any:
    """A torch file of a checkpoint, read by torch's weights_only unpickler, which builds
    tensors, plain containers and numbers only: a pickle that would run code is refused
    (ValueError) instead of run. A file that cannot be read raises UnreadableCheckpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load checkpoint file {path}: it holds objects other than tensors, "
            "plain containers and numbers, and unpickling them could run arbitrary code. "
            "The trainers never write such files: remove it unless you trust its source"
        ) from exc
    except (OSError, MemoryError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise UnreadableCheckpoint(f"checkpoint file {path} is missing") from exc
        raise  # the machine's trouble, not the file's: never a reason to skip it
    except Exception as exc:  # what a cut file raises: RuntimeError, EOFError, IndexError, ...
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: BaseException) -> UnreadableCheckpoint:
    return UnreadableCheckpoint(f"checkpoint file {path} cannot be read (cut short by a "
                                f"crash, or not a checkpoint): {type(exc).__name__}: {exc}")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file (which holds tensors only: nothing to unpickle)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise UnreadableCheckpoint(f"checkpoint file {path} is missing")
    try:
        return load_file(path)
    except Exception as exc:  # a cut file: SafetensorError, ...
        raise _unreadable(path, exc) from exc


def load_weight_files(directory: Path, stem: str) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained wrote as `<stem>.safetensors`, or in the shards its
    `<stem>.safetensors.index.json` lists."""
    index = directory / f"{stem}.safetensors.index.json"
    if not index.is_file():
        return load_safetensors(directory / f"{stem}.safetensors")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError) as exc:
        raise _unreadable(index, exc) from exc
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_safetensors(directory / shard))
    return weights


def load_exported_weights(directory: Path, exports: list[dict[str, Any]]
                          ) -> dict[str, torch.Tensor]:
    """The trained module's state dict, from the transformers folders `write_checkpoint`
    exported (without the tied weights save_pretrained leaves out)."""
    weights: dict[str, torch.Tensor] = {}
    for export in exports:
        for stem, prefix in export["files"].items():
            files = load_weight_files(directory / export["folder"], stem)
            weights.update({prefix + key: value for key, value in files.items()})
    return weights


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint folder's state: trainer_state.json's fields and its tensors, and
    "weights" (the trained module's state dict; None when it is in dcp/), "optimizer"
    (None likewise), "scheduler", "rng" (a list by rank) and "dcp" (the sharded state's
    folder or None). A checkpoint that cannot be read raises UnreadableCheckpoint; one
    holding a pickle that would run code, ValueError."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise UnreadableCheckpoint(f"checkpoint {path} has no readable {TRAINER_STATE} "
                                   f"(not a checkpoint?): {type(exc).__name__}: {exc}"
                                   ) from exc
    if not isinstance(state, dict) or "step" not in state:
        raise UnreadableCheckpoint(f"checkpoint {path}: {TRAINER_STATE} has no 'step'")
    state = join_tensors(state, load_safetensors(path / TRAINER_TENSORS))
    dcp = path / DCP_FOLDER
    state["dcp"] = dcp if dcp.is_dir() else None
    state["weights"] = None if state["dcp"] else load_exported_weights(path, state["exports"])
    state["optimizer"] = None if state["dcp"] else load_torch_file(path / OPTIMIZER_FILE)
    state["scheduler"] = load_torch_file(path / SCHEDULER_FILE)
    ranks = sorted((int(m.group(1)), p) for p in path.iterdir()
                   if (m := RNG_FILE.fullmatch(p.name)))
    state["rng"] = [load_torch_file(p) for _, p in ranks]
    if not state["rng"]:
        raise UnreadableCheckpoint(f"checkpoint {path} has no rng_state_<rank>.pth")
    return state


def load_resume_checkpoint(resume_from: str, output_dir: str | Path
                           ) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from and its state: the folder `resume_from` (whose
    failure to load raises), or for "latest" the newest checkpoint of output_dir that
    can be read, with a warning naming each newer one skipped (a file cut short by a
    crash or a full disk must not strand the good ones before it). A checkpoint refused
    as unsafe is never skipped: it raises."""
    if resume_from != "latest":
        path = resolve_checkpoint(resume_from, output_dir)
        return path, load_checkpoint(path)
    resolve_checkpoint(resume_from, output_dir)  # raises when there is none
    skipped: list[str] = []
    for path in reversed(checkpoints_by_step(output_dir)):
        try:
            state = load_checkpoint(path)
        except UnreadableCheckpoint as exc:
            skipped.append(str(exc))
            continue
        if skipped:
            warnings.warn(f"resume_from='latest': resuming from {path.name}, skipping newer "
                          f"checkpoints that cannot be read: {'; '.join(skipped)}",
                          stacklevel=2)
        return path, state
    raise UnreadableCheckpoint(f"resume_from='latest': no checkpoint in {output_dir} can be "
                               f"read: {'; '.join(skipped)}")


def peft_parts(module: nn.Module) -> dict[str, nn.Module]:
    """The outermost peft models inside `module` (itself included), by the prefix of
    their keys in its state dict ("" or "actor.model.", say)."""
    parts: dict[str, nn.Module] = {}
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        if is_peft_model(sub) and not any(prefix.startswith(p) for p in parts):
            parts[prefix] = sub
    return parts


def restore_adapter(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load an adapter as peft's save_pretrained wrote it (peft's keys) into the peft
    `model`, by peft's own inverse (`set_peft_model_state_dict`, as from_pretrained
    does); its frozen base weights stay as they are. The keys must be exactly those
    the adapter saves."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    check_single_adapter(model)
    expected = set(get_peft_model_state_dict(model, adapter_name=DEFAULT_ADAPTER))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise UnreadableCheckpoint(f"the checkpoint's adapter does not fit the trained "
                                   f"peft model: missing {missing}, unexpected {unexpected}")
    result = set_peft_model_state_dict(model, weights, adapter_name=DEFAULT_ADAPTER)
    if result.unexpected_keys:
        raise UnreadableCheckpoint(f"the checkpoint's adapter does not fit the trained "
                                   f"peft model: unexpected {result.unexpected_keys}")


def restore_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's exported weights into an unsharded `module`. save_pretrained
    leaves out tied weights (an lm_head sharing the embeddings): a key missing from
    `weights` is fine only when its tensor is one that was loaded under another name.
    A peft model inside `module` gets its adapter (`restore_adapter`); its frozen base
    weights, which the checkpoint does not hold, stay as they are."""
    parts = peft_parts(module)
    rest = dict(weights)
    for prefix, model in parts.items():
        adapter = {k[len(prefix):]: rest.pop(k) for k in list(rest) if k.startswith(prefix)}
        restore_adapter(model, adapter)
    missing, unexpected = module.load_state_dict(rest, strict=False)
    current = module.state_dict()
    loaded = {current[k].data_ptr() for k in rest if k in current}
    untied = [k for k in missing if current[k].data_ptr() not in loaded
              and not any(k.startswith(p) for p in parts)]
    if unexpected or untied:
        raise UnreadableCheckpoint(f"the checkpoint's weights do not fit the trained module: "
                                   f"missing {untied}, unexpected {unexpected}")


# --- the models a checkpoint does not hold --------------------------------------------------


#: the weights of a frozen model a checkpoint did not record (early LoRA checkpoints'
#: base model): not checked on resume
UNRECORDED = "-"


def _describe(identity: dict[str, str] | None) -> str:
    if identity is None:
        return "none"
    return f"name_or_path {identity['name_or_path']!r}, weights {identity['weights']}"


def check_same_frozen_models(saved: dict[str, Any] | None, current: dict[str, Any],
                             path: Path) -> None:
    """Refuse to resume with frozen models other than the run's (`model_identity` by
    role): their weights are not in the checkpoint, and a different reference would
    silently change every loss from here on. The weights decide (a model moved to
    another folder is the same model); name_or_path helps tell which was which.
    Checkpoints written before they were recorded (saved None) are not checked."""
    if saved is None:
        return
    for role, identity in current.items():
        before = saved.get(role)
        if before is not None and before["weights"] == UNRECORDED:
            continue  # written before this role's weights were recorded
        same = (before is None) == (identity is None) and (
            identity is None or before["weights"] == identity["weights"])
        if not same:
            raise ValueError(
                f"resume_from: {path} was written with a different {role} ("
                f"{_describe(before)}) than this trainer's ({_describe(identity)}); "
                f"resume with the {role} the run started with"
            )
