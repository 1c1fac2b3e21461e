"""rlhf_fast.group_advantages: the Triton kernel (through the interpreter) against the
reference, equal scores, huge scores and NaN isolation."""

import math

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
        ({"scale": "mean"}, ValueError,
         r"scale must be one of \('std', 'batch'\) or None, got 'mean'"),
        ({"estimator": "ppo"}, ValueError, r"estimator must be one of \('grpo', 'rloo'"),
        ({"estimator": "opo"}, ValueError, "lengths is required for this estimator"),
        ({"estimator": "remax"}, ValueError, "baselines is required for this estimator"),
        ({"estimator": "remax", "baselines": torch.randn(6)}, ValueError,
         r"baselines must have scores' shape \(12,\), got \(6,\)"),
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


# ----------------------------------------------------------------- the estimators
# verl's compute_<name>_outcome_advantage, rewritten from its per-group loops


def verl_outcome(name, scores, group_size, lengths=None, eps=1e-6, norm_by_std=True):
    out = torch.zeros_like(scores)
    alpha = len(scores) / max(int(torch.count_nonzero(scores)), 1)
    for start in range(0, len(scores), group_size):
        g = scores[start:start + group_size]
        n = len(g)
        mean = g.mean()
        if name == "rloo":
            a = g * n / (n - 1) - mean * n / (n - 1)
        elif name == "opo":
            w = lengths[start:start + group_size].to(g.dtype)
            a = g - (w * g).sum() / w.sum()
        elif name == "grpo_passk":
            top, idx = torch.topk(g, 2)
            a = torch.zeros_like(g)
            a[idx[0]] = (top[0] - top[1]) / ((g.std() + eps) if norm_by_std else 1.0)
        elif name == "gpg":
            a = alpha * (g - mean)
        elif name == "reinforce_plus_plus_baseline":
            a = g - mean
        else:  # grpo
            a = (g - mean) / (g.std() + eps) if norm_by_std else g - mean
        out[start:start + group_size] = a
    return out


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "opo", "grpo_passk", "gpg",
                                       "reinforce_plus_plus_baseline"])
def test_estimators_agree_with_verl(estimator):
    """Distinct scores (no ties for pass@k's best), groups of 2 to 6, nonzero lengths."""
    for group_size in (2, 3, 6):
        scores = torch.randn(4 * group_size, dtype=torch.float64)
        scores[0] = 0.0  # gpg counts the nonzero scores
        lengths = torch.randint(1, 40, scores.shape)
        ours = reference.group_advantages(scores, group_size, estimator=estimator,
                                          lengths=lengths)
        theirs = verl_outcome(estimator, scores, group_size, lengths)
        assert rel_err(ours, theirs) < 1e-12, (estimator, group_size)


def test_estimators_hand_cases():
    scores = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 3.0], dtype=torch.float64)

    def adv(**kw):
        return reference.group_advantages(scores, 3, **kw).tolist()

    # rloo: s minus the mean of the two others
    assert adv(estimator="rloo") == pytest.approx([1 - 4, 2 - 3.5, 6 - 1.5, 0, 0, 0])
    # opo: lengths 1, 1, 2 -> baseline (1 + 2 + 12) / 4
    lengths = torch.tensor([1, 1, 2, 0, 0, 0])
    assert reference.group_advantages(scores, 3, estimator="opo", lengths=lengths).tolist() \
        == pytest.approx([1 - 3.75, 2 - 3.75, 6 - 3.75, 0, 0, 0])  # zero lengths: the mean
    # pass@k: only the best, 6 - 2, over the std of (1, 2, 6) = sqrt(7); a tie: 0
    std = math.sqrt(7)
    assert adv(estimator="grpo_passk", eps=1e-12) == pytest.approx([0, 0, 4 / std, 0, 0, 0])
    assert adv(estimator="grpo_passk", scale=None) == pytest.approx([0, 0, 4, 0, 0, 0])
    # gpg: 6 scores, all nonzero: alpha 1
    assert adv(estimator="gpg") == pytest.approx([-2, -1, 3, 0, 0, 0])
    # grpo over the batch's std (TRL's scale_rewards="batch")
    batch_std = scores.std().item()
    assert adv(scale="batch", eps=1e-12) == pytest.approx(
        [-2 / batch_std, -1 / batch_std, 3 / batch_std, 0, 0, 0])
    baselines = torch.full((6,), 2.5, dtype=torch.float64)
    assert reference.group_advantages(scores, 3, estimator="remax", baselines=baselines
                                      ).tolist() == pytest.approx((scores - 2.5).tolist())


ESTIMATOR_CASES = [("grpo", "std"), ("grpo", "batch"), ("grpo", None), ("rloo", "std"),
                   ("opo", "std"), ("grpo_passk", "std"), ("grpo_passk", "batch"),
                   ("grpo_passk", None), ("gpg", "std"),
                   ("reinforce_plus_plus_baseline", "std"), ("remax", "std")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator, scale", ESTIMATOR_CASES)
@pytest.mark.parametrize("group_size, n_groups", [(1, 5), (2, 5), (7, 3), (1500, 2)])
def test_estimators_match_reference(estimator, scale, dtype, group_size, n_groups):
    """Groups of 1500 span two chunks of the kernel (pass@k's top two merge over them);
    one group of equal scores, one with a tie for the best."""
    scores = (torch.randn(group_size * n_groups, dtype=torch.float64) * 3 + 1).to(dtype)
    scores[:group_size] = scores[0]
    if group_size > 2:
        scores[group_size + 1] = scores[group_size:2 * group_size].max()
    lengths = torch.randint(0, 30, scores.shape)
    baselines = torch.randn(scores.shape, dtype=dtype)
    out = rlhf_fast.group_advantages(scores, group_size, estimator=estimator, scale=scale,
                                     lengths=lengths, baselines=baselines)
    ref = reference.group_advantages(scores.double(), group_size, estimator=estimator,
                                     scale=scale, lengths=lengths, baselines=baselines.double())
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype] or (ref == 0).all() and (out == 0).all()
    if estimator != "remax" and group_size > 1:
        assert (out[:group_size] == 0).all()  # equal scores: exactly 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("estimator", ["rloo", "opo", "grpo_passk"])
def test_estimators_keep_a_nan_in_its_group(monkeypatch, backend, estimator):
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    scores = torch.randn(12)
    lengths = torch.randint(1, 9, (12,))
    clean = rlhf_fast.group_advantages(scores, 4, estimator=estimator, lengths=lengths)
    scores[5] = float("nan")
    out = rlhf_fast.group_advantages(scores, 4, estimator=estimator, lengths=lengths)
    assert out[4:8].isnan().all()
    assert torch.equal(out[:4], clean[:4]) and torch.equal(out[8:], clean[8:])


def test_gdpo_normalises_each_reward_then_sums():
    """verl's compute_gdpo_outcome_advantage before its whitening: grpo per reward column,
    weighted sum; one reward drowning the other under plain grpo of the sum does not here."""
    scores = torch.tensor([[1.0, 100.0], [0.0, 300.0], [1.0, 200.0], [0.0, 200.0]],
                          dtype=torch.float64)
    weights = torch.tensor([0.5, 2.0], dtype=torch.float64)
    out = reference.group_advantages(scores, 2, estimator="gdpo", weights=weights)
    per = [reference.group_advantages(scores[:, k].contiguous(), 2) for k in range(2)]
    assert out.tolist() == pytest.approx((0.5 * per[0] + 2.0 * per[1]).tolist())
    # a pair's grpo advantages: -+ half its gap / (its unbiased std + eps); equal pair: 0
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    b = 100 / (100 * math.sqrt(2) + 1e-6)
    assert out.tolist() == pytest.approx(
        [0.5 * a - 2 * b, -0.5 * a + 2 * b, 0.5 * a, -0.5 * a], rel=1e-12)


@pytest.mark.parametrize("scale", ["std", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gdpo_matches_reference(scale, dtype):
    scores = torch.randn(4 * 5, 3, dtype=torch.float64).to(dtype)
    weights = torch.rand(3, dtype=torch.float64)
    for w in (None, weights):
        out = rlhf_fast.group_advantages(scores, 5, estimator="gdpo", scale=scale, weights=w)
        ref = reference.group_advantages(scores.double(), 5, estimator="gdpo", scale=scale,
                                         weights=w)
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("kwargs, match", [
    (dict(scores=torch.randn(12)), r"scores must have shape \[B, K\] \(one column per reward\)"),
    (dict(weights=torch.ones(2)), r"weights must have shape \[K\] = \(3,\), got \(2,\)"),
    (dict(scale="batch"), r'scale must be "std" or None for estimator "gdpo"'),
])
def test_gdpo_bad_inputs(kwargs, match):
    args = dict(scores=torch.randn(12, 3), group_size=4, estimator="gdpo") | kwargs
    with pytest.raises(ValueError, match=match):
        rlhf_fast.group_advantages(**args)
