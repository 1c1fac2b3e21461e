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

The public function calls the `KernelOp`, which is the custom op when traced and the
launcher itself in plain eager calls (`KernelOp` says why).

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
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

NAMESPACE = "rlhf_fast"
Config = TypeVar("Config")


def kernel_op(name: str, *, mutates_args: tuple[str, ...] = ()
              ) -> Callable[[Callable[..., Any]], KernelOp]:
    """Register the decorated launcher as the custom op ``rlhf_fast::<name>`` (see the
    module docstring); returns it as a `KernelOp`."""

    def register(launch: Callable[..., Any]) -> KernelOp:
        return KernelOp(name, launch, mutates_args)

    return register


class KernelOp:
    """A launcher registered as a custom op, called like a function.

    Under torch.compile, a dispatch mode (FakeTensorMode, make_fx, the tests' recorders)
    or on tensor subclasses, a call is the custom op's. Eager calls on plain tensors run
    the launcher directly, through an autograd.Function built from the same
    `register_autograd` pieces: the same code, without the dispatcher's round trips
    through Python (about 40 us per op and pass on a CPU core, more than the whole op
    costs the host otherwise). Meta tensors run the launcher too (the memory budgets
    count its allocations with the launches skipped); a dispatch mode that must see
    inside the op uses `launch_within`.
    """

    def __init__(self, name: str, launch: Callable[..., Any], mutates_args: tuple[str, ...]):
        self.name, self.launch = name, launch
        KERNEL_OPS[f"{NAMESPACE}::{name}"] = self
        self.op = torch.library.custom_op(f"{NAMESPACE}::{name}", launch,
                                          mutates_args=mutates_args)
        if mutates_args:  # an op that writes into its arguments returns nothing
            self.op.register_fake(lambda *args: None)
        self.eager: type[torch.autograd.Function] | None = None

    def register_fake(self, fake: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: the outputs' shapes, dtypes and strides from the inputs'."""
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable[..., Any], *,
                          setup_context: Callable[..., Any]) -> None:
        """As ``torch.library.register_autograd``: `setup_context(ctx, inputs, output)`
        saves what `backward(ctx, *grads)` (one grad per output) needs."""
        self.op.register_autograd(backward, setup_context=setup_context)

        def forward(ctx: Any, *args: Any) -> Any:
            output = self.launch(*args)
            setup_context(ctx, args, output)
            return output

        self.eager = type(f"{NAMESPACE}_{self.name}", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args: Any) -> Any:
        if not _plain_eager_call(args):
            return self.op(*args)
        if self.eager is not None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.eager.apply(*args)
        return self.launch(*args)


#: every KernelOp, by its custom op's qualified name ("rlhf_fast::logprobs")
KERNEL_OPS: dict[str, KernelOp] = {}


def launch_within(mode: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> Any:
    """For a dispatch mode that counts what happens inside an op (memory, FLOPs, host
    syncs): the custom op `func`'s launcher, run with `mode` back on (a mode is off while
    it handles a call, so it would see the op as one call)."""
    with mode:
        return KERNEL_OPS[func._schema.name].launch(*args, **kwargs)


def _plain_eager_call(args: tuple[Any, ...]) -> bool:
    """No compiler, no dispatch mode, no tensor subclass: nothing that needs the op."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and all(type(a) is torch.Tensor for a in args if isinstance(a, torch.Tensor)))


def config_args(config: Any) -> list[float]:
    """A kernel config (a frozen dataclass of float, int and bool fields) as a list of
    floats, the form a custom op's schema can carry; ints are exact up to 2^53."""
    if torch.compiler.is_compiling():  # a constant of the graph; Dynamo skips lru_cache
        return [float(getattr(config, field.name)) for field in dataclasses.fields(config)]
    return list(_config_floats(config))


@functools.lru_cache(maxsize=1024)
def _config_floats(config: Any) -> tuple[float, ...]:
    return tuple(float(getattr(config, field.name)) for field in dataclasses.fields(config))


def config_from_args(cls: type[Config], args: Sequence[float]) -> Config:
    """The inverse of `config_args` for the dataclass `cls`."""
    return _config_of(cls, tuple(args))


_CASTS: dict[str, Callable[[float], Any]] = {"float": float, "int": int, "bool": bool}


@functools.lru_cache(maxsize=1024)
def _config_of(cls: type[Config], args: tuple[float, ...]) -> Config:
    # cached: a training run calls each op with a handful of configs, at every step
    return cls(**{field.name: _CASTS[str(field.type)](value)
                  for field, value in zip(dataclasses.fields(cls), args, strict=True)})


def empty_like_absent(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The placeholder a custom op returns for an output it was not asked for (a schema
    cannot return None): a 0-element tensor on `like`'s device."""
    return torch.empty(0, dtype=like.dtype if dtype is None else dtype, device=like.device)


def registered_ops() -> list[str]:
    """The qualified names of every custom op registered so far (``rlhf_fast::...``)."""
    import rlhf_fast  # noqa: F401 - imports every op module, which registers its ops

    namespace = getattr(torch.ops, NAMESPACE)
    return sorted(f"{NAMESPACE}::{name}" for name in dir(namespace)
                  if isinstance(getattr(namespace, name), torch._ops.OpOverloadPacket))
