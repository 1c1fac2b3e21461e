"""The ops' kernels as `torch.library` custom ops, in the namespace ``rlhf_fast``.

A Triton launch behind a plain ``autograd.Function`` breaks a ``torch.compile`` graph;
a custom op does not: Dynamo records it as one call, AOTAutograd traces its registered
backward, Inductor places it as an extern kernel, and CUDA graphs capture its launches.
Each op module declares, next to its public function:

- the forward launch as a typed function decorated with `kernel_op` (the schema comes
  from its annotations; a kernel config travels as `config_args`' float list);
- a fake implementation (``@op.register_fake``): the outputs' shapes and dtypes, which is
  all tracing needs;
- its backward (another `kernel_op`) and ``op.register_autograd``, guarded by
  `checks.differentiable_once`.

Why ``custom_op`` and not ``triton_op`` / ``wrap_triton``: under ``TRITON_INTERPRET=1``
(the CPU test path) kernels are interpreter functions, which ``wrap_triton`` refuses, so a
``triton_op`` could not be compiled or checked without a GPU; and Inductor would gain
nothing from seeing inside, as it never fuses into a user kernel. The custom ops run the
same launchers on every device (CUDA: compiled kernels; CPU: the interpreter); off the
GPU without the interpreter, the public functions run `rlhf_fast.reference`, plain torch
code that Inductor compiles and fuses itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

NAMESPACE = "rlhf_fast"
Config = TypeVar("Config")


def kernel_op(name: str, *, mutates_args: tuple[str, ...] = ()
              ) -> Callable[[Callable[..., Any]], Any]:
    """Register the decorated launcher as the custom op ``rlhf_fast::<name>`` (see the
    module docstring). Meta tensors run the launcher itself, not the fake: the memory
    budgets count its allocations on meta tensors with the launches skipped."""

    def register(launch: Callable[..., Any]) -> Any:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", launch, mutates_args=mutates_args)
        op.register_kernel("meta")(launch)
        return op

    return register


def config_args(config: Any) -> list[float]:
    """A kernel config (a dataclass of float, int and bool fields) as a list of floats, the
    form a custom op's schema can carry; ints are exact up to 2^53."""
    return [float(getattr(config, field.name)) for field in dataclasses.fields(config)]


_CASTS: dict[str, Callable[[float], Any]] = {"float": float, "int": int, "bool": bool}


def config_from_args(cls: type[Config], args: Sequence[float]) -> Config:
    """The inverse of `config_args` for the dataclass `cls`."""
    return cls(**{field.name: _CASTS[str(field.type)](value)
                  for field, value in zip(dataclasses.fields(cls), args, strict=True)})


def empty_like_absent(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The placeholder a custom op returns for an output it was not asked for (a schema
    cannot return None): a 0-element tensor on `like`'s device."""
    return torch.empty(0, dtype=like.dtype if dtype is None else dtype, device=like.device)


def registered_ops() -> list[str]:
    """The qualified names of every custom op registered so far (``rlhf_fast::...``)."""
    import rlhf_fast  # noqa: F401 - imports every op module, which registers its ops

    return sorted(f"{NAMESPACE}::{name}" for name in dir(getattr(torch.ops, NAMESPACE))
                  if isinstance(getattr(getattr(torch.ops, NAMESPACE), name),
                                torch._ops.OpOverloadPacket))
