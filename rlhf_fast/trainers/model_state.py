"""A trained model's state beside the checkpoint folders that hold it: what a peft
(LoRA) model is, the full (FSDP2-gathered) or sharded (DCP) state of a module and its
optimizer, and the identity (a weights fingerprint) of a frozen model a checkpoint
records instead of holding.

Nothing is read back by unpickling arbitrary objects: DCP's metadata is read by
`DCPMetadataUnpickler`, its other items by torch's weights_only unpickler.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_fast.trainers.run import is_fsdp2_sharded

# --- peft models ---------------------------------------------------------------------------


def is_peft_model(model: nn.Module) -> bool:
    """A peft model (adapters that can be switched off), without importing peft."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


#: the adapter a peft model's save_pretrained writes into the folder itself (the others
#: go to subfolders by name); checkpoints hold this one
DEFAULT_ADAPTER = "default"


def check_single_adapter(model: nn.Module) -> None:
    """Checkpoints of a peft model hold its one adapter, named "default" (what
    get_peft_model makes): refuse others before a run trains for nothing."""
    names = list(model.peft_config)
    if names != [DEFAULT_ADAPTER]:
        raise ValueError(f"checkpoints of a peft model hold one adapter named "
                         f"{DEFAULT_ADAPTER!r}; this model has {names}")


# --- full state (FSDP2: gathered) -----------------------------------------------------------


def gather_model_state(module: nn.Module) -> dict[str, Any]:
    """The full, unsharded state dict of `module`; under FSDP2 gathered into the main
    process's CPU memory (the other processes get an empty dict), the optimizer left
    sharded.

    Under FSDP2 this is a collective: every process must call it (each holds one shard;
    saving rank 0's own state dict would lose the others').
    """
    if not is_fsdp2_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore_training_state(module: nn.Module, optimizer: torch.optim.Optimizer,
                           module_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
    """Load full state dicts (a checkpoint's exported weights and optimizer.pt) into
    `module` and `optimizer` (into their shards under FSDP2; every process reads the
    same checkpoint files)."""
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


# --- sharded state (FSDP2): torch.distributed.checkpoint -----------------------------------
#
# DCP writes its `.metadata` with pickle.dump and its stock reader loads it with
# pickle.load, and its stock planner loads the non-tensor items (the optimizer's
# param_groups) with torch.load(weights_only=False): either would run whatever a planted
# file asks. Verifying a hash would only prove the file is the one we wrote if the hash
# were kept somewhere an attacker cannot write, which a checkpoint folder is not; so the
# metadata is read by an unpickler that builds only DCP's own metadata classes and the
# few torch / stdlib types they hold (all plain data), and the items by weights_only.

#: (module, name) of every class DCP's metadata pickle may name
DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch._utils", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),
    ("pathlib._local", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` building only `DCP_METADATA_GLOBALS` and torch's
    dtypes; any other global (os.system, ...) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load DCP metadata: it names {module}.{name}, which is not one of "
            "DCP's metadata classes (unpickling it could run arbitrary code)")


def load_dcp_metadata(path: Path) -> Any:
    """DCP's metadata file, by `DCPMetadataUnpickler`: a file naming anything else
    raises ValueError."""
    try:
        with open(path, "rb") as f:
            return DCPMetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def safe_dcp_reader(directory: Path) -> Any:
    """A `FileSystemReader` of `directory` whose metadata is read by
    `load_dcp_metadata` (the stock one calls pickle.load)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = load_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(directory))


def safe_dcp_planner() -> Any:
    """A `DefaultLoadPlanner` that reads DCP's non-tensor items with torch's
    weights_only unpickler (the stock one with weights_only=False)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._nested_dict import set_element

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            item = torch.load(value, map_location="cpu", weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                            item)
            else:
                self.state_dict[read_item.dest_index.fqn] = item

    return WeightsOnlyLoadPlanner()


def save_sharded_state(module: nn.Module, optimizer: torch.optim.Optimizer,
                       directory: Path) -> None:
    """Every process writes its shards of `module` and `optimizer` into `directory`
    (DCP; a collective), gathering nothing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)


def load_sharded_state(module: nn.Module, optimizer: torch.optim.Optimizer,
                       directory: Path) -> None:
    """Load `save_sharded_state`'s folder into `module` and `optimizer` (their shards
    under FSDP2, the whole of them otherwise; a collective), reading no pickle that
    could run code."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # get_state_dict creates the optimizer's state (AdamW's moments) if no step has, so
    # that DCP has tensors to load it into
    model_state, optimizer_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, storage_reader=safe_dcp_reader(directory), planner=safe_dcp_planner())
    set_state_dict(module, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


# --- the identity of a frozen model --------------------------------------------------------


#: the name under which a peft tuner layer holds the layer it wraps
PEFT_WRAPPED_LAYER = "base_layer"

# integer dtypes by width: a tensor's bits, viewed as integers, sum exactly
INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_fingerprint(model: nn.Module, *, without_adapters: bool = False) -> str:
    """A short hash of `model`'s state dict: every tensor's name, shape, dtype, and the
    integer sum of its values' bits. Exact and order-free, so the same weights give the
    same fingerprint on any device and thread count. Under FSDP2 a collective (each
    sharded tensor is gathered in turn): every process must call it.

    without_adapters: of a peft model, its frozen base only (the keys naming none of
    its adapters), which stays the same while the adapter trains, under the names it
    has without the adapter's layers (whichever modules they wrap)."""
    digest = hashlib.sha256()
    adapters = set(getattr(model, "peft_config", {})) if without_adapters else set()
    for name, tensor in model.state_dict().items():
        if adapters:
            parts = name.split(".")
            if adapters.intersection(parts):
                continue
            name = ".".join(p for p in parts if p != PEFT_WRAPPED_LAYER)
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
