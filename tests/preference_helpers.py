"""Helpers of the tests of the sequence-level preference losses (simpo_loss, cpo_loss,
orpo_loss, kto_loss): run an op on leaves and backprop, compare the kernels with the
float64 reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from helpers import rel_err

# fp32 math: ~1e-7 per operation, a few dozen operations; fp64 likewise at 1e-16. A
# gradient rounded to bf16 / fp16 is off by up to 2^-8 / 2^-11 of itself.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-2}
LOW_PRECISION = (torch.bfloat16, torch.float16)
NAN = float("nan")


def random_upstream(shape) -> torch.Tensor:
    """|g| in [0.5, 1.5), random sign: no fp16 gradient underflows to subnormals."""
    return (torch.randn(shape, dtype=torch.float64).sign()
            * (0.5 + torch.rand(shape, dtype=torch.float64)))


def lengths(B: int, kind: str = "int") -> torch.Tensor:
    """Answer lengths: "int" in [1, 64], "int32", "float" (non-integer, some below 1) or
    "zero" (ints, a quarter of them 0: clamped to 1)."""
    if kind == "float":
        return torch.rand(B, dtype=torch.float64) * 64
    value = torch.randint(1, 65, (B,))
    if kind == "zero":
        value[torch.randperm(B)[: max(1, B // 4)]] = 0
    return value.int() if kind == "int32" else value


def run(fn: Callable, tensors: dict, positional: Sequence[str], upstream=None,
        grads: Sequence[str] = (), **options):
    """`fn` on leaves built from `tensors` (the `positional` ones in order, the rest as
    keywords), backprop of `upstream` (the loss's shape; ones by default) through the loss.
    Returns (output, {name: grad} for the `grads` that are tensors)."""
    leaves = {k: (None if v is None else v.clone().requires_grad_(k in grads))
              for k, v in tensors.items()}
    out = fn(*(leaves[k] for k in positional),
             **{k: v for k, v in leaves.items() if k not in positional}, **options)
    if upstream is None:
        upstream = torch.ones(out.loss.shape, dtype=torch.float64)
    (out.loss * upstream.to(out.loss.dtype)).sum().backward()
    return out, {k: leaves[k].grad for k in grads if leaves[k] is not None}


def as_float64(tensors: dict, names: Sequence[str]) -> dict:
    return {k: (v.double() if v is not None and k in names else v) for k, v in tensors.items()}


def compare(op: Callable, ref_op: Callable, tensors: dict, positional: Sequence[str],
            grads: Sequence[str], backward_name: str, tol: float,
            scales: dict[str, float] | None = None, accuracy_fields: Sequence[str] = (),
            **options):
    """The kernels (`op`) against the float64 reference on the same (rounded) inputs: every
    output field and the gradients of `grads` for a random upstream gradient.

    A field's error is |out - ref| / max(|ref|, scale): relative, except where `scales`
    gives the size of the terms a field is a difference or mean of (a margin near 0 of
    rewards ~1 is as exact as those rewards). `accuracy_fields` are fractions of the batch:
    an exact tie of rounded low-precision inputs may count either way."""
    B = tensors[positional[0]].shape[0]
    shape = (B,) if options.get("reduction") == "none" else ()
    upstream = random_upstream(shape)
    out, g = run(op, tensors, positional, upstream, grads, **options)
    ref, g_ref = run(ref_op, as_float64(tensors, grads), positional, upstream, grads,
                     **options)
    assert type(out.loss.grad_fn).__name__ == backward_name  # the kernel ran
    math64 = any(tensors[k].dtype == torch.float64 for k in positional[:2])
    low = tensors[positional[0]].dtype in LOW_PRECISION
    scales = scales or {}
    for name, a, b in zip(ref._fields, out, ref):
        assert a.dtype == (torch.float64 if math64 else torch.float32), name
        assert a.shape == b.shape, name
        assert torch.equal(a.isnan(), b.isnan()), name
        if name in accuracy_fields:
            assert (a - b).abs().max().item() <= (1.01 / B if low else 1e-6), name
            continue
        a, b = a[~b.isnan()].double(), b[~b.isnan()].double()
        denom = max(b.norm().item(), scales.get(name, 0.0))
        err = (a - b).norm().item()
        assert (err / denom if denom else err) < tol, (name, err, denom)
    for name in g_ref:
        assert g[name].dtype == tensors[name].dtype, name
        assert torch.isfinite(g[name]).all(), name
        assert rel_err(g[name], g_ref[name]) < max(tol, TOL[tensors[name].dtype]), name
    return out, g
