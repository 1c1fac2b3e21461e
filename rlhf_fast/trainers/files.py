"""Atomic writes into an output_dir: a kill or a full disk mid-save leaves what was there
before intact (and a temp file that `remove_stale_temps` deletes), and the files get the
permissions open() and mkdir() would give them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn


@functools.cache
def process_umask() -> int:
    """The umask, read once (reading it means setting it, briefly, for every thread)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def umask_mode(base: int) -> int:
    """`base` (0o666 for files, 0o777 for folders) less the umask: the mode open() and
    mkdir() would give. mkstemp / mkdtemp create owner-only ones instead."""
    return base & ~process_umask()


# errnos of a write that failed for want of space
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_errno(exc: BaseException) -> int | None:
    """The errno of the out-of-space OSError behind `exc` (itself, or what it was raised
    from or while handling), or None when lack of space is not the cause."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def reporting_a_full_disk(path: Path) -> Iterator[None]:
    """Re-raise a save that failed for want of space as an OSError saying so, naming
    `path`. torch.save's zip writer turns the disk's ENOSPC into a RuntimeError about
    stream positions ("unexpected pos ..."), which would be the last line a user reads;
    the OSError survives only as its context."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        code = disk_full_errno(exc)
        if code is None:
            raise
        raise OSError(code, f"{os.strerror(code)}: the disk is full, could not write "
                            f"{path} (what was there before is intact)") from exc


def replace_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write` a temp file in path's folder, then rename it over `path`.

    A crash mid-write leaves the previous file intact: the rename is atomic (a kill
    leaves the temp file, which `remove_stale_temps` deletes). The file gets the usual
    permissions (as open() would make it), not the temp file's 0600. A full disk raises
    an OSError saying so.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with reporting_a_full_disk(path):
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), umask_mode(0o666))
            os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename over `path`."""
    replace_atomic(path, lambda f: torch.save(state, f))


# the temp files and folders the atomic saves write into an output_dir: "." + the name
# they become + "." + mkstemp's random part + ".tmp" (replace_atomic,
# save_pretrained_atomic), or ".checkpoint-<step>.tmp-" + the random part (a checkpoint
# folder being written, or the replaced one being deleted: `temp_folder`)
STALE_TEMP = re.compile(r"\.(checkpoint-\d+\.pt|value_model\.pt|value_model|metrics\.jsonl"
                        r"|final)\.[a-z0-9_]+\.tmp|\.checkpoint-\d+\.tmp-[a-z0-9_]+")


def remove_stale_temps(output_dir: str | Path) -> list[Path]:
    """Delete the temp files and folders that saves killed mid-way left in output_dir
    (the run's own saves, once finished, leave none); returns their paths."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    stale = sorted(p for p in directory.iterdir() if STALE_TEMP.fullmatch(p.name))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return stale


def save_pretrained_atomic(model: nn.Module, tokenizer: Any, directory: Path,
                           state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`save_pretrained` (of `state_dict` if given: the gathered weights of a sharded
    model) into a temp folder, then swap it in for `directory`.

    The swap renames `directory` to ``.<name>.old``, the new folder to `directory`, then
    deletes the old one. A crash in between leaves ``.<name>.old`` behind: without
    `directory` it is the previous version (the crash fell between the two renames), and
    the next save replaces it; beside `directory` it is stale, and is deleted first.
    """
    old = directory.with_name(f".{directory.name}.old")
    if old.exists() and directory.exists():
        shutil.rmtree(old)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp",
                                 dir=directory.parent))
    try:
        temp.chmod(umask_mode(0o777))
        with reporting_a_full_disk(directory):
            # save_pretrained pops the tied weights' keys from the dict it is given
            weights = None if state_dict is None else dict(state_dict)
            model.save_pretrained(temp, state_dict=weights, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if directory.exists():
        os.replace(directory, old)
    os.replace(temp, directory)
    if old.exists():
        shutil.rmtree(old)


def temp_folder(final: Path) -> Path:
    """A new empty folder beside `final` (``.<name>.tmp-<random>``, which
    `remove_stale_temps` deletes when a kill leaves it), with the usual permissions."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    temp.chmod(umask_mode(0o777))
    return temp


def fsync_tree(directory: Path) -> None:
    """Flush every file and folder under `directory` (and itself) to the disk, so that
    once it is renamed into place a power cut cannot leave it with empty files."""
    for root, _, names in os.walk(directory):
        for name in names:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(Path(root))


def fsync_folder(directory: Path) -> None:
    """Flush a folder's entries (the names created or renamed in it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(temp: Path, final: Path) -> None:
    """Flush `temp`, a complete folder, then rename it to `final` (atomic: readers see
    the whole folder or none). A folder already at `final` (a stale checkpoint of the
    same step, left by the run this one resumed) is first renamed to a temp name, then
    deleted; a kill in between leaves that temp name for `remove_stale_temps`."""
    fsync_tree(temp)
    replaced = None
    if final.exists():
        replaced = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        os.rename(final, replaced / final.name)
    os.rename(temp, final)
    fsync_folder(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def write_folder_atomic(final: Path, write: Callable[[Path], Any]) -> None:
    """`write` the files of a folder into a temp folder beside `final`, then publish it
    as `final` (`publish_folder`). A failure or a kill mid-write leaves no `final` (the
    temp folder is deleted, or left for `remove_stale_temps` by a kill); a full disk
    raises an OSError saying so."""
    temp = temp_folder(final)
    try:
        with reporting_a_full_disk(final):
            write(temp)
            publish_folder(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with the permissions open() would give (it writes 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    path.chmod(umask_mode(0o666))
