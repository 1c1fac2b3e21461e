"""Checkpoints: finding, pruning and safely loading checkpoint-<step>.pt files, the
identities of the frozen models a checkpoint does not hold, and the (FSDP2-gathered)
state dicts of a module and its optimizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_fast.trainers.run import is_fsdp2_sharded


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}.pt"


def checkpoints_by_step(output_dir: str | Path) -> list[Path]:
    """The checkpoint-<step>.pt files of output_dir, oldest step first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*.pt")
             if p.stem.removeprefix("checkpoint-").isdigit()]
    return sorted(found, key=lambda p: int(p.stem.removeprefix("checkpoint-")))


def prune_checkpoints(written: Path, keep: int) -> list[Path]:
    """Delete the oldest checkpoints beside `written` (just saved) so that at most `keep`
    remain; `written` itself is never deleted, nor anything when keep is 0. Returns the
    deleted paths. Call it only once `written` is safely on disk."""
    if keep <= 0:
        return []
    others = [p for p in checkpoints_by_step(written.parent) if p != written]
    doomed = others[: max(0, len(others) - (keep - 1))]
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return doomed


def resolve_checkpoint(resume_from: str, output_dir: str | Path) -> Path:
    """`resume_from` as a file, or "latest": the newest checkpoint in output_dir."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_file():
            raise FileNotFoundError(f"resume_from: no checkpoint file at {path}")
        return path
    found = checkpoints_by_step(output_dir)
    if not found:
        raise FileNotFoundError(f"resume_from='latest': no checkpoint-*.pt in {output_dir}")
    return found[-1]


def check_no_checkpoints(output_dir: str | Path) -> None:
    """Refuse to start a run afresh in a folder holding checkpoints: after a crash,
    resume_from="latest" would pick the newest checkpoint there, maybe an earlier run's."""
    found = checkpoints_by_step(output_dir)
    if found:
        raise ValueError(
            f"output_dir {str(output_dir)!r} already holds {len(found)} checkpoint(s) of an "
            f"earlier run (newest: {found[-1].name}); pass resume_from (\"latest\" or a "
            "checkpoint file) to continue it, or choose an empty output_dir"
        )


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be read: cut short, or not a checkpoint at all."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state, read by torch's weights_only unpickler, which builds tensors,
    plain containers and numbers only: a pickle that would run code is refused
    (ValueError) instead of run. A file that cannot be read raises UnreadableCheckpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load checkpoint {path}: it holds objects other than tensors, plain "
            "containers and numbers, and unpickling them could run arbitrary code. The "
            "trainers never write such checkpoints: remove it unless you trust its source"
        ) from exc
    except (OSError, MemoryError):
        raise  # the machine's trouble, not the file's: never a reason to skip it
    except Exception as exc:  # what a cut file raises: RuntimeError, EOFError, IndexError, ...
        raise UnreadableCheckpoint(f"checkpoint {path} cannot be read (cut short by a crash, "
                                   f"or not a checkpoint): {type(exc).__name__}: {exc}"
                                   ) from exc
    if not isinstance(state, dict) or "step" not in state:
        raise UnreadableCheckpoint(f"checkpoint {path} is not a trainer checkpoint (a dict "
                                   f"with a 'step'), got {type(state).__name__}")
    return state


def load_resume_checkpoint(resume_from: str, output_dir: str | Path
                           ) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from and its state: the file `resume_from` (whose failure
    to load raises), or for "latest" the newest checkpoint of output_dir that can be
    read, with a warning naming each newer one skipped (a file cut short by a crash or a
    full disk must not strand the good ones before it). A checkpoint refused as unsafe
    is never skipped: it raises."""
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


# --- the models a checkpoint does not hold --------------------------------------------------


# integer dtypes by width: a tensor's bits, viewed as integers, sum exactly
INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of `model`'s state dict: every tensor's name, shape, dtype, and the
    integer sum of its values' bits. Exact and order-free, so the same weights give the
    same fingerprint on any device and thread count. Under FSDP2 a collective (each
    sharded tensor is gathered in turn): every process must call it."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor: its shards, gathered
            tensor = tensor.full_tensor()
        bits = int(tensor.view(INT_OF_WIDTH[tensor.element_size()]).sum(dtype=torch.int64))
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{bits};".encode())
    return digest.hexdigest()[:16]


def model_identity(model: nn.Module | None) -> dict[str, str] | None:
    """What a checkpoint records of a frozen model whose weights it does not hold (a
    reference, a reward model): its name_or_path and `weights_fingerprint`."""
    if model is None:
        return None
    return {"name_or_path": str(getattr(model, "name_or_path", "") or ""),
            "weights": weights_fingerprint(model)}


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
        same = (before is None) == (identity is None) and (
            identity is None or before["weights"] == identity["weights"])
        if not same:
            raise ValueError(
                f"resume_from: {path} was written with a different {role} ("
                f"{_describe(before)}) than this trainer's ({_describe(identity)}); "
                f"resume with the {role} the run started with"
            )


def gather_training_state(module: nn.Module, optimizer: torch.optim.Optimizer
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full, unsharded state dicts of `module` and `optimizer`, on the CPU under FSDP2.

    Under FSDP2 this is a collective: every process must call it (each holds one shard;
    saving rank 0's own state dict would lose the others').
    """
    if not is_fsdp2_sharded(module):
        return module.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(module, options=options),
            get_optimizer_state_dict(module, optimizer, options=options))


def restore_training_state(module: nn.Module, optimizer: torch.optim.Optimizer,
                           module_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
    """Load full state dicts written by `gather_training_state` (into shards under FSDP2;
    every process reads the same checkpoint file)."""
    if not is_fsdp2_sharded(module):
        module.load_state_dict(module_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, module_state, options=options)
    set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)


def strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
