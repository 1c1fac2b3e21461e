"""The providers other than rlhf_fast: optional peer packages, imported lazily (only the
cases that run a peer pay for its import), and ``torch.compile`` of the eager code."""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import inspect
import os
import types
from collections.abc import Callable
from typing import Any

import torch


class Runs(enum.Enum):
    """Where a peer's code runs besides CUDA; the value is how a skipped row says it."""

    #: Triton kernels that do not work in the interpreter (cut-cross-entropy's).
    CUDA = "CUDA"
    #: Triton kernels that also run in the interpreter, so CI gates their adapters there.
    CUDA_OR_INTERPRETER = "CUDA (or TRITON_INTERPRET=1)"
    #: PyTorch code, or a package that picks its own torch ops off CUDA (TRL's kernels
    #: run on CUDA and XPU only, and TRL falls back to PyTorch elsewhere).
    ANY_DEVICE = "any device"


#: Optional peers: provider name -> (package, where its code runs). On the CPU a
#: ``CUDA_OR_INTERPRETER`` peer runs only under TRITON_INTERPRET=1, a ``CUDA`` one never.
PEERS = {
    "liger": ("liger_kernel", Runs.CUDA_OR_INTERPRETER),
    "cce": ("cut_cross_entropy", Runs.CUDA),
    "trl": ("trl", Runs.ANY_DEVICE),
}


@functools.cache
def _import_attr(module: str, name: str) -> tuple[Any, str | None]:
    package = module.split(".")[0]
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as exc:  # installed but broken: a missing dependency, a torch mismatch
        if isinstance(exc, ModuleNotFoundError) and exc.name == package:
            return None, f"{package} not installed"
        return None, f"{package} failed to import: {type(exc).__name__}: {exc}"[:120]


def peer_entry(
    provider: str, module: str, name: str, device: torch.device, *, runs: Runs | None = None
) -> tuple[Any, str | None]:
    """(``module.name`` of the peer `provider`, None), or (None, why it cannot run on
    `device`). Imported lazily: only the cases that run a peer pay for its import.
    ``runs``: where this entry runs when that is not where its package's does (``PEERS``),
    e.g. Liger-Kernel's chunked losses, PyTorch code in a package of Triton kernels."""
    package, package_runs = PEERS[provider]
    runs = package_runs if runs is None else runs
    entry, reason = _import_attr(module, name)
    if reason is not None:
        return None, reason
    if torch.device(device).type == "cuda" or runs is Runs.ANY_DEVICE:
        return entry, None
    if runs is Runs.CUDA_OR_INTERPRETER and os.environ.get("TRITON_INTERPRET") == "1":
        return entry, None
    return None, f"{package} runs on {runs.value} only"


def require_peer(
    provider: str, module: str, name: str, device: torch.device, *, runs: Runs | None = None
) -> Any:
    """`peer_entry`'s entry, or a RuntimeError saying why the peer cannot run (raised
    inside a case's provider, it makes the case a skipped row)."""
    entry, reason = peer_entry(provider, module, name, device, runs=runs)
    if reason is not None:
        raise RuntimeError(reason)
    return entry


@dataclasses.dataclass(frozen=True)
class Entry:
    """One attribute a peer provider needs: ``module.name`` of the peer `provider`'s
    package, running where `runs` says (None: where its package runs, ``PEERS``)."""

    provider: str
    module: str
    name: str
    runs: Runs | None = None

    def reason(self, device: torch.device) -> str | None:
        """Why this entry cannot run on `device` (None when it can)."""
        return peer_entry(self.provider, self.module, self.name, device, runs=self.runs)[1]

    def require(self, device: torch.device) -> Any:
        """The entry, or the RuntimeError of `require_peer`."""
        return require_peer(self.provider, self.module, self.name, device, runs=self.runs)


@functools.cache
def liger_chunked_skips_gradient(module: str, name: str) -> bool:
    """Whether the Liger-Kernel chunked-loss base ``module.name`` runs its forward alone
    when nothing requires grad (Liger-Kernel 0.8.5: ``torch.func.grad_and_value`` over
    the inputs that require grad only, nothing when none does) rather than its gradient
    GEMMs regardless (earlier releases, e.g. 0.8.2: fixed ``argnums``), read from its
    forward's source. False where it cannot be read (a missing peer's cases are skipped)."""
    base, reason = _import_attr(module, name)
    if reason is not None:
        return False
    try:
        source = inspect.getsource(base.forward)
    except (OSError, TypeError):
        return False
    return "requires_grad" in source


def first_output(out: Any) -> Any:
    """A peer loss's value: the first of the outputs it returns as a tuple (the loss,
    then its metrics or auxiliary outputs), or its one output. Not cached: a cache would
    keep every loss it saw alive, with the autograd graph behind it (a peer's saved
    gradients, gigabytes at the GPU shapes)."""
    return out[0] if isinstance(out, tuple) else out


@functools.cache
def compiled(fn: Callable[..., Any], variant: str = "") -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False)``, built once per (function, variant), on first
    use (the suites skip their compile providers on the CPU), and cached: a suite may
    call this in every timed call, and each variant's code copy is a new code object,
    which Dynamo would compile again.

    A variant compiles a copy of `fn`'s code of its own: Dynamo keeps a bounded number of
    graphs per code object (8) and falls back to eager past it, silently, so a suite
    whose shapes x (grad, no grad) would pass that compiles one variant per mode.
    """
    if variant:
        code = fn.__code__.replace(co_name=f"{fn.__name__}__{variant}")
        copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__,
                                  fn.__closure__)
        copy.__kwdefaults__ = fn.__kwdefaults__
        fn = copy
    return torch.compile(fn, dynamic=False)


def compiled_for_mode(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """`compiled` `fn` for a case's mode: one variant without grad (``fwd``), one for the
    backward modes (``bwd`` and ``fwd+bwd`` build the same graphs), each seeing a suite's
    GPU shapes only."""
    return compiled(fn, "fwd" if mode == "fwd" else "grad")
