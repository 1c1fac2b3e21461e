"""rlhf_fast.masked_whiten: the Triton kernels (through the interpreter) against the
reference and an independent formula."""

import pytest
import torch

import rlhf_fast
from helpers import random_mask, rel_err
from rlhf_fast import reference
from rlhf_fast.kernels import masked_mean as kernel

STATS = kernel.STATS_BLOCK
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def whiten_independent(x, mask, shift_mean, eps):
    """torch on the selected entries x[mask]: (s - mean) / sqrt(var + eps), var unbiased."""
    sel = x.double()[mask]
    var = sel.var() if sel.numel() > 1 else torch.zeros((), dtype=torch.float64)
    y = (sel - sel.mean()) / torch.sqrt(var + eps) + (0.0 if shift_mean else sel.mean())
    out = torch.zeros(x.shape, dtype=torch.float64)
    out[mask] = y
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape", [(1,), (6, 17), (3, STATS + 7), (4, 2, 3)])
def test_masked_whiten_matches_reference(dtype, shift_mean, shape, poisoned_empty):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype)
    mask = torch.rand(shape) < 0.6
    mask.view(-1)[-1] = True
    out = rlhf_fast.masked_whiten(x, mask, shift_mean=shift_mean)
    assert out.shape == x.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = reference.masked_whiten(x.double(), mask, shift_mean=shift_mean)
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(out, whiten_independent(x, mask, shift_mean, 1e-8)) < TOL[dtype]
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("n", [2, 17, 64, 100, STATS + 904])
@pytest.mark.parametrize("value", [0.7, 1e-3, 3.3e4])
def test_masked_whiten_equal_entries_give_exactly_zero(monkeypatch, backend, shift_mean, n,
                                                       value):
    """Equal valid entries whiten to exactly 0 (x itself with shift_mean=False); a rounded
    mean left ~6e-8 / sqrt(eps = 1e-8) = 6e-4 there. n = STATS + 904 spans two blocks of
    the kernel's statistics pass; the masked entries hold other values."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    x = torch.full((n,), value)
    mask = torch.rand(n) < 0.8
    mask[:2] = True
    x[~mask] = torch.randn(int((~mask).sum()))
    out = rlhf_fast.masked_whiten(x, mask, shift_mean=shift_mean)
    expect = torch.where(mask, x if not shift_mean else torch.zeros(n), torch.zeros(n))
    assert torch.equal(out, expect)
    # a real spread stays exact against the float64 reference
    y = (value * (1 + 0.5 * torch.randn(n, dtype=torch.float64))).float()
    out = rlhf_fast.masked_whiten(y, mask, shift_mean=shift_mean)
    assert rel_err(out, reference.masked_whiten(y.double(), mask, shift_mean=shift_mean)) < 1e-5


def test_masked_whiten_large_offset_is_stable():
    """Per-block M2 around the block mean, merged pairwise: no E[x^2] - E[x]^2 cancellation
    (in fp32 that gives a variance of 0 here instead of 0.25). What is left is an fp32 mean
    of values near 3000, off by ~1e-7 * 3000 relative to a std of 0.5 (torch in fp32 does
    no better): below 1e-3."""
    x = (torch.randn(5 * STATS + 11, dtype=torch.float64) * 0.5 + 3000.0).float()
    mask = torch.rand(x.shape) < 0.8
    out = rlhf_fast.masked_whiten(x, mask)
    assert rel_err(out, reference.masked_whiten(x.double(), mask)) < 2e-3


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_gradcheck(shift_mean):
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    mask = random_mask(5, 7)
    mask[0, :2] = True

    def fn(t):
        return rlhf_fast.masked_whiten(t, mask, shift_mean=shift_mean, eps=1e-3)

    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_gradient_matches_reference(dtype, shift_mean):
    x = torch.randn(3, STATS + 3, dtype=torch.float64).to(dtype)
    mask = torch.rand(x.shape) < 0.5
    mask[0, 0] = True
    x[~mask] = float("nan")  # never read, in the forward or the backward
    xk, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    out = rlhf_fast.masked_whiten(xk, mask, shift_mean=shift_mean)
    ref = reference.masked_whiten(xr, mask, shift_mean=shift_mean)
    g = torch.randn_like(ref)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    assert xk.grad.dtype == dtype
    assert torch.isfinite(xk.grad).all() and (xk.grad[~mask] == 0).all()
    assert rel_err(xk.grad, xr.grad) < TOL[dtype]


def test_masked_whiten_single_and_no_valid_entry():
    x = torch.randn(4, 6)
    mask = torch.zeros(4, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="mask must have at least one valid"):
        rlhf_fast.masked_whiten(x, mask)
    assert (rlhf_fast.masked_whiten(x, mask, check_mask=False) == 0).all()
    mask[2, 3] = 1  # one valid entry: variance 0
    assert (rlhf_fast.masked_whiten(x, mask) == 0).all()
    kept = rlhf_fast.masked_whiten(x, mask, shift_mean=False)
    assert kept[2, 3] == x[2, 3] and kept.count_nonzero() == 1



@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_masked_whiten_huge_values_keep_finite_statistics(monkeypatch, backend, magnitude):
    """Squared deviations of |x| ~ 1e19 and more overflow fp32: the variance must not be
    formed as such (masked_whiten gave NaN or 0 there)."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    # x spans several stats blocks
    x = (torch.randn(3 * STATS + 11, dtype=torch.float64) * magnitude - magnitude).float()
    mask = torch.rand(x.shape) < 0.8
    leaf = x.clone().requires_grad_()
    leaf_ref = x.double().requires_grad_()
    out = rlhf_fast.masked_whiten(leaf, mask)
    ref = reference.masked_whiten(leaf_ref, mask)
    assert rel_err(out, ref) < 1e-5
    upstream = torch.randn(x.shape, dtype=torch.float64)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    # the gradient scales as 1 / magnitude: compare it relative to its own norm
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().max() > 0
    assert rel_err(leaf.grad, leaf_ref.grad) < 1e-4
