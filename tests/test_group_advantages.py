"""rlhf_fast.group_advantages: the Triton kernel (through the interpreter) against the
reference, equal scores, huge scores and NaN isolation."""

import pytest
import torch

import rlhf_fast
from helpers import rel_err
from rlhf_fast import reference

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def test_group_advantages_hand_case(poisoned_empty):
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    std = rlhf_fast.group_advantages(scores, 3, eps=1e-6)
    expected = [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), 0.0, 0.0, 0.0]  # std of 1, 2, 3 is 1
    assert std.tolist() == pytest.approx(expected, abs=1e-7)
    assert rlhf_fast.group_advantages(scores, 3, scale=None).tolist() == [-1, 0, 1, 0, 0, 0]
    # a group of one: advantage 0 in both modes
    assert (rlhf_fast.group_advantages(scores, 1) == 0).all()
    assert (rlhf_fast.group_advantages(scores, 1, scale=None) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale", ["std", None])
@pytest.mark.parametrize("group_size, n_groups", [(1, 7), (2, 5), (7, 3), (16, 9), (1500, 2)])
def test_group_advantages_matches_reference(dtype, scale, group_size, n_groups, poisoned_empty):
    scores = (torch.randn(group_size * n_groups, dtype=torch.float64) * 3 + 1).to(dtype)
    out = rlhf_fast.group_advantages(scores, group_size, scale=scale, eps=1e-4)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = reference.group_advantages(scores.double(), group_size, scale=scale, eps=1e-4)
    assert rel_err(out, ref) < TOL[dtype]
    if group_size > 1:  # independent: torch on each group
        g = scores.double().view(n_groups, group_size)
        centred = g - g.mean(1, keepdim=True)
        expect = centred / (g.std(1, keepdim=True) + 1e-4) if scale else centred
        assert rel_err(out, expect.reshape(-1)) < TOL[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scale", ["std", None])
@pytest.mark.parametrize("group_size", [1, 2, 16, 17, 64, 100])
@pytest.mark.parametrize("value", [0.7, 1e-3, 3.3e4])
def test_group_advantages_equal_scores_give_exactly_zero(monkeypatch, backend, scale,
                                                          group_size, value):
    """A group of equal scores has no preference: advantages exactly 0. A rounded mean left
    s - mean ~ 6e-8 over a std of the same size (eps 1e-6): 0.056 at G = 64. Next to it, a
    group with a real spread stays exact against a float64 formula."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    equal = torch.full((group_size,), value)
    spread = (value * (1 + 0.5 * torch.randn(group_size, dtype=torch.float64))).float()
    out = rlhf_fast.group_advantages(torch.cat((equal, spread, equal)), group_size, scale=scale)
    assert torch.equal(out[:group_size], torch.zeros(group_size))
    assert torch.equal(out[2 * group_size:], torch.zeros(group_size))
    g = spread.double()
    centred = g - g.mean()
    std = g.std() if group_size > 1 else torch.zeros((), dtype=torch.float64)
    expect = centred / (std + 1e-6) if scale else centred
    assert rel_err(out[group_size:2 * group_size], expect) < 1e-5


def test_group_advantages_empty_and_nan_isolation():
    assert rlhf_fast.group_advantages(torch.zeros(0), 4).shape == (0,)
    scores = torch.randn(12)
    clean = rlhf_fast.group_advantages(scores, 4)
    scores[5] = float("nan")
    out = rlhf_fast.group_advantages(scores, 4)
    assert out[4:8].isnan().all()
    assert torch.equal(out[:4], clean[:4]) and torch.equal(out[8:], clean[8:])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"scores": torch.randn(2, 6)}, ValueError, r"scores must have shape \[B\]"),
        ({"scores": torch.arange(12)}, TypeError, "scores must have dtype"),
        ({"group_size": 5}, ValueError,
         "group_size must divide.*scores.shape.0. = 12 is not a multiple of group_size = 5"),
        ({"group_size": 0}, ValueError, "group_size must be an int >= 1, got 0"),
        ({"group_size": 4.0}, TypeError, "group_size must be an int"),
        ({"scale": "mean"}, ValueError, "scale must be \"std\" or None, got 'mean'"),
        ({"eps": 0.0}, ValueError, "eps must be a finite float > 0"),
        ({"eps": 1e-300}, ValueError, r"eps must be representable in fp32.*\[1.17549e-38"),
        ({"group_size": 2**64}, ValueError, r"group_size must be an int in .*\(int64\)"),
    ],
)
def test_group_advantages_bad_inputs(kwargs, error, match):
    args = {"scores": torch.randn(12), "group_size": 4}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rlhf_fast.group_advantages(**args)



@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_group_advantages_huge_scores_keep_finite_statistics(monkeypatch, backend, magnitude):
    """Squared deviations of |x| ~ 1e19 and more overflow fp32: the variance must not be
    formed as such (group_advantages and masked_whiten gave NaN or 0 there))."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    # groups of 1500 span two chunks of the group kernel
    scores = (torch.randn(3 * 1500, dtype=torch.float64) * magnitude + 2 * magnitude).float()
    out = rlhf_fast.group_advantages(scores, 1500)
    assert rel_err(out, reference.group_advantages(scores.double(), 1500)) < 1e-5
