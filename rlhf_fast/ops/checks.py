"""Input validation shared by the public ops. Every error names the argument."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.fx.experimental.symbolic_shapes import guard_scalar

from rlhf_fast.ops.library import empty_like_absent

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Triton passes float scalars to kernels as fp32: a parameter outside fp32's normal range
# overflows to inf or flushes to 0 there (temperature 1e-300 would divide by zero).
FP32_TINY = torch.finfo(torch.float32).tiny
FP32_MAX = torch.finfo(torch.float32).max


def check_tensor(name: str, value: object, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        expected = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({expected}), got {value.dtype}")
    return value


def check_same_device(
    name: str, value: torch.Tensor, other_name: str, other: torch.Tensor
) -> None:
    if value.device != other.device:
        raise ValueError(
            f"{name} must be on {other_name}'s device {other.device}, got {value.device}"
        )


def check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float > 0, got {type(value).__name__}")
    value = specialised(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return check_fp32(name, value)


def specialised(value: Any) -> Any:
    """`value` as a check can read it. Under torch.compile a number that changed between
    calls is symbolic (torch's automatic dynamic): guarded on its value (another value
    recompiles), where Dynamo traces guard_scalar (torch >= 2.8 or so). Otherwise, and
    for anything but an int or float, `value` itself."""
    if (torch.compiler.is_compiling() and _can_specialise()
            and isinstance(value, (int, float)) and not isinstance(value, bool)):
        return guard_scalar(value)
    return value


@torch.compiler.assume_constant_result
def _can_specialise() -> bool:
    from torch._dynamo import trace_rules
    from torch._dynamo.variables import SkipFunctionVariable

    return trace_rules.lookup(guard_scalar) is not SkipFunctionVariable


def check_fp32(name: str, value: float) -> float:
    """`value` (already range-checked by the caller) as a float, if the kernels can take it
    as fp32: 0, +-inf, or a magnitude in fp32's normal range. NaN is the caller's to reject."""
    value = float(value)
    if math.isfinite(value) and value != 0 and not FP32_TINY <= abs(value) <= FP32_MAX:
        raise ValueError(
            f"{name} must be representable in fp32 (the kernels take it as fp32): a "
            f"magnitude in [{FP32_TINY:.6g}, {FP32_MAX:.6g}] unless 0, got {value}"
        )
    return value


def check_int(name: str, value: object) -> int:
    """An int in int64's range (the kernels and torch take integer arguments as int64)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(
            f"{name} must be an int in [{INT64_MIN}, {INT64_MAX}] (int64), got {value}"
        )
    return value


# ----------------------------------------------------------------- masks, shapes, ranges

MASK_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, *FLOAT_DTYPES
)


def check_unit_interval(name: str, value: object) -> float:
    """A finite float (or int) in [0, 1], e.g. a discount factor."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    value = specialised(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be a float in [0, 1], got {value}")
    return check_fp32(name, value)


def check_same_shape(
    name: str, value: torch.Tensor, other_name: str, other: torch.Tensor
) -> None:
    if tuple(value.shape) != tuple(other.shape):
        raise ValueError(
            f"{name} must have the shape of {other_name} {tuple(other.shape)}, "
            f"got {tuple(value.shape)}"
        )


def check_bool(name: str, value: object, *, allow_none: bool = False) -> bool | None:
    """A real bool: a flag such as "no" or 0 would otherwise read as its truth value."""
    if allow_none and value is None:
        return None
    if not isinstance(value, bool):
        expected = "a bool or None" if allow_none else "a bool"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    return value


def check_2d(name: str, value: torch.Tensor) -> None:
    if value.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got {tuple(value.shape)}")


def check_mask_like(mask: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """A mask of `like`'s shape and device, bool or numeric."""
    check_tensor("mask", mask, MASK_DTYPES)
    check_same_shape("mask", mask, like_name, like)
    check_same_device("mask", mask, like_name, like)


def check_last_value(last_value: torch.Tensor | None, rewards: torch.Tensor) -> None:
    if last_value is None:
        return
    check_tensor("last_value", last_value, FLOAT_DTYPES)
    check_same_device("last_value", last_value, "rewards", rewards)
    if tuple(last_value.shape) != (rewards.shape[0],):
        raise ValueError(
            f"last_value must have shape [B] = ({rewards.shape[0]},) (rewards.shape[0]), "
            f"got {tuple(last_value.shape)}"
        )


def host_checks_by_default(tensor: torch.Tensor) -> bool:
    """Whether a check that reads tensor values on the host (a device sync: label range,
    an all-masked batch) runs when the caller leaves it unset (None): on CPU tensors only,
    and never under torch.compile, where reading a value would break the graph."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def check_some_valid(mask: torch.Tensor, check_mask: bool | None) -> None:
    if check_mask is None:
        check_mask = host_checks_by_default(mask)
    if check_mask and not bool((mask != 0).any()):
        raise ValueError(
            f"mask must have at least one valid (nonzero) entry, got none of {mask.numel()}"
        )


def differentiable_once(backward: Callable) -> Callable:
    """`once_differentiable` that also refuses a backward run with create_graph=True.

    once_differentiable raises only when an incoming gradient itself requires grad; in a
    Hessian-vector product (create_graph=True on a scalar loss) none does, and the
    second-order terms would silently come out as zero.
    """
    first_order = once_differentiable(backward)
    op = backward.__qualname__.split(".")[0]

    @functools.wraps(backward)
    def guarded(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{op} is differentiable once: backward with create_graph=True (second "
                "derivatives, Hessian-vector products) is not supported; use the ops of "
                "rlhf_fast.reference for those"
            )
        return first_order(ctx, *grads)

    return guarded


def register_masked_reduction_autograd(op: Any, backward_op: Callable[..., torch.Tensor]
                                       ) -> None:
    """The autograd of a masked reduction ``op(x, mask, setting) -> (out, count)`` (a
    `kernel_op`; `count` non-differentiable): d x is ``backward_op(grad, mask, count,
    setting, x.dtype)``; the mask and the setting get none. Differentiable once."""

    def setup_context(ctx, inputs, output):
        x, mask, ctx.setting = inputs
        ctx.x_dtype = x.dtype
        _, count = output
        ctx.save_for_backward(mask, count)
        ctx.mark_non_differentiable(count)

    def backward(ctx, grad, _grad_count):
        mask, count = ctx.saved_tensors
        return backward_op(grad, mask, count, ctx.setting, ctx.x_dtype), None, None

    # named as the op's own backward: `differentiable_once`'s error names the op by it
    backward.__name__ = backward.__qualname__ = f"_{op.name}_backward"
    op.register_autograd(differentiable_once(backward), setup_context=setup_context)

def overlaps_itself(tensor: torch.Tensor) -> bool:
    """Whether two elements of `tensor` may share memory: sorted by stride, each dim must
    step past everything the smaller-stride dims span (stride 0 of an expand() fails)."""
    span = 1
    for stride, size in sorted((st, n) for st, n in zip(tensor.stride(), tensor.shape) if n > 1):
        if stride < span:
            return True
        span += (size - 1) * stride
    return False


def check_inplace_backward(name: str, logits: torch.Tensor) -> None:
    """`logits` may receive its own gradient (``inplace_backward=True``): no two elements
    share memory, and it is no leaf requiring grad nor a view of one."""
    if overlaps_itself(logits):
        raise ValueError(
            f"inplace_backward=True needs {name} whose elements do not share memory, got "
            f"strides {logits.stride()} for shape {tuple(logits.shape)} (an expand()ed "
            "view?); pass inplace_backward=False"
        )
    if torch.is_grad_enabled() and logits.requires_grad:
        # The backward would overwrite a leaf's values (a parameter, or the caller's own
        # tensor) with its gradient, as an in-place op on it would; torch refuses those.
        base = logits if logits._base is None else logits._base
        if logits.is_leaf or (base.is_leaf and base.requires_grad):
            raise ValueError(
                f"inplace_backward=True needs {name} computed by a differentiable op (e.g. "
                "the lm_head's output), got a leaf tensor requiring grad"
                f"{'' if logits.is_leaf else ' (a view of one)'}, whose values the "
                "gradient would overwrite; pass inplace_backward=False"
            )


# ----------------------------------------------------------------- sequence-level losses


def check_batch(name: str, value: object) -> torch.Tensor:
    """A float ``[B]`` tensor with B >= 1 (the first argument of a sequence-level loss),
    contiguous."""
    check_tensor(name, value, FLOAT_DTYPES)
    if value.dim() != 1 or value.shape[0] == 0:
        raise ValueError(f"{name} must have shape [B] with B >= 1, got {tuple(value.shape)}")
    return value.contiguous()


def check_like(name: str, value: object, like_name: str, like: torch.Tensor,
               dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> torch.Tensor:
    """A tensor of `dtypes` with `like`'s shape and device, contiguous."""
    check_tensor(name, value, dtypes)
    check_same_device(name, value, like_name, like)
    check_same_shape(name, value, like_name, like)
    return value.contiguous()


def check_token_counts(name: str, value: object, like_name: str, like: torch.Tensor
                       ) -> torch.Tensor:
    """Answer lengths in tokens, int or float, `like`'s shape and device, contiguous.
    Negative or NaN ones raise on CPU (on CUDA the check would need a device sync)."""
    value = check_like(name, value, like_name, like, INDEX_DTYPES + FLOAT_DTYPES)
    # not (>= 0) catches NaN too, which `< 0` lets through
    if host_checks_by_default(value) and bool((bad := ~(value >= 0)).any()):
        raise ValueError(f"{name} must be token counts >= 0, found {value[bad][0].item()}")
    return value


def contiguous(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each tensor contiguous (the kernels on [B] inputs index them flat), None kept."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def fake_loss_outputs(like: torch.Tensor, dtype: torch.dtype, per_pair: bool, n_rewards: int,
                      n_stats: int) -> tuple[torch.Tensor, ...]:
    """A fake implementation's outputs of a sequence-level loss on [B] inputs (`like`):
    the loss (0-d, or [B] where `per_pair`, reduction "none"), `n_rewards` [B] rewards and
    the stats [n_stats], all `dtype` on `like`'s device."""
    B = like.shape[0]
    return (like.new_empty((B,) if per_pair else (), dtype=dtype),
            *(like.new_empty((B,), dtype=dtype) for _ in range(n_rewards)),
            like.new_empty((n_stats,), dtype=dtype))


def fake_grads(inputs: tuple[torch.Tensor | None, ...], needs_grad: list[bool],
               like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A fake implementation's gradients of [B] `inputs`: contiguous, each input's dtype
    where `needs_grad` asks for one, else `empty_like_absent(like)`."""
    return tuple(x.new_empty(x.shape) if needed and x is not None else empty_like_absent(like)
                 for x, needed in zip(inputs, needs_grad))
