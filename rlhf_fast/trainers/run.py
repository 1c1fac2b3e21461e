"""Where a trainer runs: its processes (torchrun), device and precision, its random
streams (seeded per rank, saved and restored per rank), and DDP wrapping.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Run:
    """Where this process trains: its rank among `world` processes and its device."""

    rank: int
    world: int
    device: torch.device
    precision: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def fused_linear(self, requested: bool | None) -> bool:
        """A config's use_fused_linear: None means on when training on a GPU."""
        return self.device.type == "cuda" if requested is None else requested

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for precision "bf16", nothing for "fp32"."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Average each metric over the processes (a no-op for one)."""
        if self.world == 1 or not values:
            return values
        stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(stacked)
        return dict(zip(values, (stacked / self.world).tolist()))

    def sum_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.sum_over_ranks_tensor(total).item())

    def sum_over_ranks_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the processes, in place (a no-op for one)."""
        if self.world > 1:
            dist.all_reduce(values)
        return values

    def peak_memory(self) -> dict[str, float]:
        """{"peak_memory_gb": the most GPU memory any process held since the last call}
        on CUDA (then the peak starts afresh), {} elsewhere."""
        if self.device.type != "cuda":
            return {}
        peak = torch.tensor([torch.cuda.max_memory_allocated(self.device) / 2**30],
                            dtype=torch.float64, device=self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        if self.world > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return {"peak_memory_gb": float(peak.item())}


def setup_run(precision: str, device: str | None = None) -> Run:
    """Join the torchrun process group when there is one, and pick device and precision.

    Under torchrun (WORLD_SIZE > 1) each process takes the GPU of its LOCAL_RANK (NCCL),
    or the CPU (gloo). precision "auto" is bf16 autocast on a GPU that supports it, fp32
    elsewhere.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    if precision == "auto":
        gpu_bf16 = target.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if gpu_bf16 else "fp32"
    return Run(rank=rank, world=world, device=target, precision=precision)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def seed_process(seed: int, run: Run) -> None:
    """Seed this process's random streams with ``seed + rank``.

    With one seed for all, every process would draw the same sampling noise (and dropout
    masks). Nothing that must agree across processes reads these streams: DDP broadcasts
    rank 0's weights when it wraps the model, and the data order comes from generators
    seeded by `seed` alone (`example_indices`).
    """
    seed_everything(seed + run.rank)


def rng_state() -> dict[str, Any]:
    """Every random stream a training step draws from, to restore on resume."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(run: Run) -> list[dict[str, Any]] | None:
    """Every process's `rng_state`, as a list indexed by rank on the main process (None
    on the others). A collective with several processes: every process must call it."""
    state = rng_state()
    if run.world == 1:
        return [state]
    gathered: list[Any] | None = [None] * run.world if run.is_main else None
    dist.gather_object(state, gathered, dst=0)
    return gathered


def restore_rng_states(saved: dict[str, Any] | list[dict[str, Any]], run: Run) -> None:
    """Restore this process's streams from a checkpoint's "rng": a list indexed by rank
    (`gather_rng_states`) or one state (checkpoints written before that: rank 0's).

    A process with no saved state (the run resumes on more processes than wrote the
    checkpoint) keeps the streams `seed_process` gave it, distinct from the others'.
    """
    states = saved if isinstance(saved, list) else [saved]
    if run.rank < len(states):
        set_rng_state(states[run.rank])


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def is_fsdp2_sharded(module: nn.Module) -> bool:
    """True when `fully_shard` (FSDP2) has turned the parameters into DTensors."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


def wrap_ddp(module: nn.Module, run: Run) -> nn.Module:
    """DistributedDataParallel around `module` for several processes, unless FSDP2
    already shards it (then its own hooks reduce the gradients)."""
    if run.world == 1 or is_fsdp2_sharded(module):
        return module
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
