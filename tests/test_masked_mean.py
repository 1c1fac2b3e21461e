"""rlhf_fast.masked_mean (and the checks it shares with masked_whiten): the Triton kernels
(through the interpreter) against the reference."""

import pytest
import torch

import rlhf_fast
from helpers import random_mask, rel_err
from rlhf_fast import reference
from rlhf_fast.kernels import masked_mean as kernel

STATS = kernel.STATS_BLOCK
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, STATS + 5), (2, 3, 5)])
def test_masked_mean_matches_reference(dtype, shape, poisoned_empty):
    x = (torch.randn(shape, dtype=torch.float64) + 0.5).to(dtype)
    mask = torch.rand(shape) < 0.6
    mask.view(-1)[0] = True
    out = rlhf_fast.masked_mean(x, mask)
    assert out.shape == () and out.dtype == reference.masked_mean(x, mask).dtype
    # the error of a sum scales with the sum of |x|, not with the mean, which can cancel
    # to near 0 (a relative bound on it failed seed 2-in-a-thousand draws)
    scale = x.double().abs()[mask].mean()
    assert (out - reference.masked_mean(x.double(), mask)).abs() <= TOL[dtype] * scale
    assert (out - x.double()[mask].mean()).abs() <= TOL[dtype] * scale  # independent
    for dim in range(-len(shape), len(shape)):
        if x.numel() // x.shape[dim] > 64:
            continue  # one program per output: too many for the interpreter
        out = rlhf_fast.masked_mean(x, mask, dim)
        ref = reference.masked_mean(x.double(), mask, dim)
        assert out.shape == ref.shape
        assert torch.equal(out.isnan(), ref.isnan())  # slices without a valid entry
        ok = ~ref.isnan()
        scale = reference.masked_mean(x.double().abs(), mask, dim)[ok]
        assert ((out[ok] - ref[ok]).abs() <= TOL[dtype] * scale).all()


def test_masked_mean_along_dim_independent():
    x = torch.randn(6, 50, dtype=torch.float64)
    mask = random_mask(6, 50)
    out = rlhf_fast.masked_mean(x, mask, dim=1)
    for b in range(6):
        if mask[b].any():
            assert out[b].item() == pytest.approx(x[b][mask[b]].mean().item(), rel=1e-12)
        else:
            assert out[b].isnan()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [None, 0, 1])
def test_masked_mean_gradient(dtype, dim):
    x = torch.randn(5, 33, dtype=torch.float64).to(dtype)
    mask = torch.rand(5, 33) < 0.7
    mask[:, 0] = True
    mask[0, 0] = True
    xk, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    out, ref = rlhf_fast.masked_mean(xk, mask, dim), reference.masked_mean(xr, mask, dim)
    g = torch.randn_like(ref)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    assert xk.grad.dtype == dtype
    assert rel_err(xk.grad, xr.grad) < TOL[dtype]


def test_masked_mean_gradcheck():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 9) < 0.5
    mask[0] = True  # every slice has a valid entry (an empty one is NaN)
    mask[:, 4] = True
    for dim in (None, 0, 1, -1):
        assert torch.autograd.gradcheck(lambda t, d=dim: rlhf_fast.masked_mean(t, mask, d), (x,))


def test_masked_mean_nan_under_mask_does_not_leak():
    x = torch.randn(4, 20)
    mask = torch.rand(4, 20) < 0.5
    mask[:, 0] = True
    x[~mask] = float("nan")
    xk = x.clone().requires_grad_()
    out = rlhf_fast.masked_mean(xk, mask, dim=1)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xk.grad).all()
    assert (xk.grad[~mask] == 0).all()


def test_masked_mean_no_valid_entry(monkeypatch):
    x = torch.randn(3, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask must have at least one valid"):
        rlhf_fast.masked_mean(x, mask)
    assert rlhf_fast.masked_mean(x, mask, check_mask=False).isnan()
    assert rlhf_fast.masked_mean(x, mask, dim=1).isnan().all()  # along a dim: NaN, no error
    xk = x.clone().requires_grad_()
    rlhf_fast.masked_mean(xk, mask, dim=0).sum().backward()
    assert (xk.grad == 0).all()
    assert rlhf_fast.masked_mean(torch.zeros(0, 3), torch.zeros(0, 3), dim=0).isnan().all()
    assert rlhf_fast.masked_mean(torch.zeros(0, 3), torch.zeros(0, 3), dim=1).shape == (0,)


@pytest.mark.parametrize("fn", ["masked_mean", "masked_whiten"])
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"x": torch.ones(3, 4, dtype=torch.long)}, TypeError, "x must have dtype"),
        ({"mask": torch.ones(4, 3)}, ValueError, r"mask must have the shape of x \(3, 4\)"),
        ({"mask": "all"}, TypeError, "mask must be a torch.Tensor"),
        ({"mask": torch.ones(3, 4, device="meta")}, ValueError, "mask must be on"),
    ],
)
def test_masked_ops_bad_inputs(fn, kwargs, error, match):
    args = {"x": torch.randn(3, 4), "mask": torch.ones(3, 4)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        getattr(rlhf_fast, fn)(**args)


def test_masked_ops_bad_parameters():
    x, mask = torch.randn(3, 4), torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"dim must be None or in \[-2, 2\).*got 2"):
        rlhf_fast.masked_mean(x, mask, 2)
    with pytest.raises(TypeError, match="dim must be an int"):
        rlhf_fast.masked_mean(x, mask, 1.0)
    with pytest.raises(ValueError, match="eps must be a finite float > 0, got -1"):
        rlhf_fast.masked_whiten(x, mask, eps=-1.0)
    with pytest.raises(TypeError, match="shift_mean must be a bool"):
        rlhf_fast.masked_whiten(x, mask, shift_mean=1)
    with pytest.raises(ValueError, match="eps must be representable in fp32"):
        rlhf_fast.masked_whiten(x, mask, eps=1e-50)
    # "no" would read as True; along a dim the flag is unused, and still checked
    with pytest.raises(TypeError, match="check_mask must be a bool or None, got str 'no'"):
        rlhf_fast.masked_whiten(x, mask, check_mask="no")
    for dim in (None, 0):
        with pytest.raises(TypeError, match="check_mask must be a bool or None, got int"):
            rlhf_fast.masked_mean(x, mask, dim, check_mask=0)
