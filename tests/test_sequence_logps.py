"""rlhf_fast.sequence_logps: the Triton kernels (through the interpreter) against the
reference in float64, and the reference against a hand computation."""

import pytest
import torch

import rlhf_fast
from helpers import kernel_backward, rel_err
from rlhf_fast import reference
from rlhf_fast.kernels import sequence_logps as kernel

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}
FLOATS = list(TOL)
KERNEL_BACKWARD = kernel_backward("sequence_logps")


def random_mask(R, T):
    """Rows of every kind, in random order: holes, all masked, a single valid token, left
    padding, right padding, all valid."""
    mask = torch.rand(R, T) < 0.6
    pos = torch.arange(T)
    for r in range(R):
        kind = r % 6
        cut = int(torch.randint(1, T, ())) if T > 1 else 0
        if kind == 1:
            mask[r] = False
        elif kind == 2:
            mask[r] = pos == int(torch.randint(0, T, ()))
        elif kind == 3:
            mask[r] = pos >= cut  # left padding
        elif kind == 4:
            mask[r] = pos < cut  # right padding
        elif kind == 5:
            mask[r] = True
    return mask[torch.randperm(R)] if R else mask


def random_logp(shape, dtype=torch.float32, mask=None):
    """Log-prob-like values (negative, no cancellation in the sums); NaN under the mask."""
    x = -torch.randn(shape, dtype=torch.float64).abs() - 0.1
    if mask is not None:
        x = x.masked_fill(mask == 0, float("nan"))
    return x.to(dtype)


def random_upstream(shape):
    """A random upstream gradient, |g| in [0.5, 1.5) (no fp16 underflow by chance)."""
    return torch.randn(shape, dtype=torch.float64).sign() * (0.5 + torch.rand(shape,
                                                                          dtype=torch.float64))


def run(fn, x, mask, average, upstream):
    """(output, d x) of `fn` for the upstream gradient `upstream` (shape of the output)."""
    leaf = x.clone().requires_grad_(True)
    out = fn(leaf, mask, average=average)
    out.backward(upstream.to(out.dtype))
    return out, leaf.grad


def compare(x, mask, average, tol):
    """The kernels against the float64 reference on the same (rounded) inputs."""
    upstream = random_upstream(x.shape[:-1])
    out, grad = run(rlhf_fast.sequence_logps, x, mask, average, upstream)
    ref, grad_ref = run(reference.sequence_logps, x.double(), mask, average, upstream)
    assert type(out.grad_fn).__name__ == KERNEL_BACKWARD  # the kernel ran, not the fallback
    assert out.shape == x.shape[:-1]
    assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert rel_err(out, ref) < tol
    assert rel_err(grad, grad_ref) < tol
    return out, grad


# ----------------------------------------------------------------- the reference by hand


def test_reference_hand_case():
    nan = float("nan")
    x = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, nan], [nan, nan, nan]],
                     dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 0]])
    assert reference.sequence_logps(x, mask).tolist() == [-1.0 - 3.0, -0.5 - 4.0, 0.0]
    assert reference.sequence_logps(x, mask, average=True).tolist() == [
        (-1.0 - 3.0) / 2, (-0.5 - 4.0) / 2, 0.0
    ]
    # the kernels agree on the hand case, and their gradient is the mask (over the count)
    for average, scale in ((False, [1.0, 1.0, 1.0]), (True, [0.5, 0.5, 1.0])):
        leaf = x.clone().requires_grad_(True)
        out = rlhf_fast.sequence_logps(leaf, mask, average=average)
        assert torch.equal(out, reference.sequence_logps(x, mask, average=average))
        out.backward(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        expected = torch.tensor([[1, 0, 1], [2, 2, 0], [0, 0, 0]], dtype=torch.float64)
        assert torch.equal(leaf.grad, expected * torch.tensor(scale, dtype=torch.float64)[:, None])


# ----------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("dtype", FLOATS)
def test_matches_reference(dtype, average, poisoned_empty):
    mask = random_mask(12, 61)
    x = random_logp(mask.shape, dtype, mask)  # NaN under the mask
    out, grad = compare(x, mask, average, TOL[dtype])
    empty = ~mask.any(-1)
    assert empty.any() and (out[empty] == 0).all()
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int8, torch.int32,
                                        torch.int64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("average", [False, True])
def test_mask_dtypes_agree(mask_dtype, average):
    mask = random_mask(7, 29)
    x = random_logp(mask.shape, torch.float32, mask)
    upstream = random_upstream(7)
    base = run(rlhf_fast.sequence_logps, x, mask, average, upstream)
    scale = 3 if mask_dtype in (torch.int32, torch.int64) else 1  # nonzero = valid
    out = run(rlhf_fast.sequence_logps, x, (mask * scale).to(mask_dtype), average, upstream)
    assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])
    compare(x, mask.to(mask_dtype), average, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("average", [False, True])
def test_masked_nan_and_inf_never_leak(dtype, average):
    mask = random_mask(6, 40)
    x = random_logp(mask.shape, torch.float64)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    x = torch.where(mask, x, garbage[torch.randint(0, 3, mask.shape)]).to(dtype)
    out, grad = run(rlhf_fast.sequence_logps, x, mask, average, random_upstream(6))
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    clean = torch.where(mask, x, torch.zeros_like(x))
    assert torch.equal(out, rlhf_fast.sequence_logps(clean, mask, average=average))


@pytest.mark.parametrize("average", [False, True])
def test_all_masked_and_single_token_rows(average):
    T = 37
    mask = torch.zeros(4, T, dtype=torch.bool)
    mask[1, 0] = mask[2, T - 1] = mask[3, 17] = True  # one valid token at either end / inside
    x = random_logp(mask.shape, torch.float32)
    upstream = torch.tensor([1.5, -2.0, 0.25, 3.0])
    out, grad = run(rlhf_fast.sequence_logps, x, mask, average, upstream)
    assert out[0] == 0 and (grad[0] == 0).all()
    assert torch.equal(out[1:], x[mask])  # a one-token sum or mean is that token, exactly
    assert torch.equal(grad[mask], upstream[1:])
    assert (grad[~mask] == 0).all()


# ----------------------------------------------------------------- edge shapes


@pytest.mark.parametrize(
    "R, T",
    [(0, 5), (1, 1), (1, 13), (7, 1), (13, 2), (7, 13), (3, 1023), (3, 1024), (3, 1025),
     (2, 2100)],
)
def test_edge_shapes(R, T, poisoned_empty):
    mask = random_mask(R, T)
    x = random_logp((R, T), torch.float32, mask)
    for average in (False, True):
        out, grad = compare(x, mask, average, TOL[torch.float32])
        assert out.shape == (R,) and grad.shape == (R, T)


def test_block_size_is_a_function_of_T_alone():
    assert [kernel.block_size(T) for T in (1, 16, 17, 1023, 1024, 1025, 5000)] == [
        16, 16, 32, 1024, 1024, 1024, 1024
    ]


def test_zero_length_rows():
    x = torch.zeros(3, 0)
    mask = torch.zeros(3, 0, dtype=torch.bool)
    assert torch.equal(reference.sequence_logps(x, mask), torch.zeros(3))
    assert torch.equal(rlhf_fast.sequence_logps(x, mask), torch.zeros(3))


@pytest.mark.parametrize("average", [False, True])
def test_leading_dims(average):
    mask = random_mask(6, 19).view(2, 3, 19)
    x = random_logp(mask.shape, torch.float32, mask)
    out, grad = compare(x, mask, average, TOL[torch.float32])
    assert out.shape == (2, 3)
    flat, _ = run(rlhf_fast.sequence_logps, x.view(6, 19), mask.view(6, 19), average,
                  torch.ones(6))
    assert torch.equal(out.view(6), flat)
    # out.sum() hands the backward a stride-0 upstream gradient
    leaf = x.clone().requires_grad_(True)
    rlhf_fast.sequence_logps(leaf, mask, average=average).sum().backward()
    count = mask.sum(-1, keepdim=True).clamp(min=1) if average else 1
    assert torch.equal(leaf.grad, mask / count)


@pytest.mark.parametrize("average", [False, True])
def test_non_contiguous_views(average):
    mask = random_mask(8, 33)
    x = random_logp(mask.shape, torch.float32, mask)
    upstream = random_upstream(8)
    views = [
        (x[:, 1:], mask[:, 1:]),  # strided rows, as for shifted labels
        (x.t().contiguous().t(), mask),  # column-major: last-dim stride != 1
        (x[::2], mask.t().contiguous().t()[::2]),  # strided rows, column-major mask
    ]
    for xv, mv in views:
        assert not (xv.is_contiguous() and mv.is_contiguous())
        out, grad = run(rlhf_fast.sequence_logps, xv, mv, average, upstream[: xv.shape[0]])
        ref, ref_grad = run(rlhf_fast.sequence_logps, xv.contiguous(), mv.contiguous(),
                            average, upstream[: xv.shape[0]])
        assert torch.equal(out, ref) and torch.equal(grad, ref_grad)


@pytest.mark.parametrize("average", [False, True])
def test_batch_invariance(average):
    mask = random_mask(24, 1500)
    x = random_logp(mask.shape, torch.float32, mask)
    full = rlhf_fast.sequence_logps(x, mask, average=average)
    for r in (0, 5, 23):
        alone = rlhf_fast.sequence_logps(x[r: r + 1], mask[r: r + 1], average=average)
        assert torch.equal(alone, full[r: r + 1])
    part = rlhf_fast.sequence_logps(x[3:10], mask[3:10], average=average)
    assert torch.equal(part, full[3:10])


@pytest.mark.parametrize("average", [False, True])
def test_gradcheck_float64(average):
    mask = random_mask(4, 6)  # holes, an empty row, a single token, left padding
    x = random_logp(mask.shape, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: rlhf_fast.sequence_logps(t, mask, average=average), (x,)
    )


def test_backend_switch_runs_the_reference(monkeypatch):
    mask = random_mask(5, 21)
    x = random_logp(mask.shape, torch.float32, mask)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    for average in (False, True):
        out = rlhf_fast.sequence_logps(x.requires_grad_(True), mask, average=average)
        assert type(out.grad_fn).__name__ != KERNEL_BACKWARD
        assert torch.equal(out, reference.sequence_logps(x, mask, average=average))


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "x, mask, average, error, match",
    [
        (torch.zeros(2, 3, dtype=torch.long), None, False, TypeError, "token_logp"),
        ([[0.0, 1.0]], None, False, TypeError, "token_logp"),
        (torch.tensor(0.5), torch.tensor(True), False, ValueError, "token_logp"),
        (None, torch.ones(3, 2, dtype=torch.bool), False, ValueError, "mask"),
        (None, torch.ones(3, dtype=torch.bool), False, ValueError, "mask"),
        (None, torch.ones(2, 3, dtype=torch.complex64), False, TypeError, "mask"),
        (None, torch.ones(2, 3, dtype=torch.bool, device="meta"), False, ValueError, "mask"),
        (None, [[1, 1, 1], [1, 1, 1]], False, TypeError, "mask"),
        (None, None, 1, TypeError, "average"),
        (None, None, "mean", TypeError, "average"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, mask, average, error, match):
    x = torch.zeros(2, 3) if x is None else x
    mask = torch.ones(2, 3, dtype=torch.bool) if mask is None else mask
    with pytest.raises(error, match=match):
        rlhf_fast.sequence_logps(x, mask, average=average)
