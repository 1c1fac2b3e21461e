"""rlhf_fast.optimal_token_baseline: the reference against a hand case and verl's
function rewritten, the Triton kernel (through the interpreter) against the reference."""

import math
from collections import defaultdict

import pytest
import torch

import rlhf_fast
from helpers import random_mask, rel_err
from rlhf_fast import reference

F64 = torch.float64
TOL = {torch.float32: 1e-5, F64: 1e-12, torch.bfloat16: 1e-5}


def random_case(B, T, dtype=F64, mask=None):
    """rewards (one outcome reward on each row's last valid token plus small token-level
    rewards), mask, old_logp, log_sum_p2 (a real distribution's: log sum p^2 >= 2 logp),
    rollout IS weights."""
    mask = random_mask(B, T) if mask is None else mask
    rewards = 0.1 * torch.randn(B, T, dtype=F64)
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask
    rewards += last * torch.randn(B, 1, dtype=F64).sign()
    old_logp = -torch.rand(B, T, dtype=F64) * 3
    log_sum_p2 = torch.maximum(2 * old_logp, -torch.rand(B, T, dtype=F64) * 2)
    rho = torch.rand(B, T, dtype=F64) + 0.5
    return (rewards.to(dtype), mask, old_logp.to(dtype), log_sum_p2.to(dtype), rho.to(dtype))


def verl_otb(rewards, mask, old_logp, sum_pi_squared, index, rho=None, handle_zero_tail=False,
             epsilon=1e-8):
    """verl's compute_optimal_token_baseline_advantage (core_algos.py), rewritten: returns
    by a reverse cumsum, w = 1 - 2 pi + sum pi^2 (times rho^2), W its masked cumsum, and per
    prompt (a Python dict of row lists) the baseline sum G W m / (sum W m + eps)."""
    m = mask.to(rewards.dtype)
    returns = (rewards * m).flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * old_logp.exp() + sum_pi_squared
    if rho is not None:
        w = w * rho**2
    cum_w = (w * m).cumsum(-1)
    groups = defaultdict(list)
    for i, key in enumerate(index):
        groups[key].append(i)
    baselines = torch.zeros_like(returns)
    for rows in groups.values():
        if len(rows) == 1:
            continue
        num = (returns[rows] * cum_w[rows] * m[rows]).sum(0)
        den = (cum_w[rows] * m[rows]).sum(0) + epsilon
        baselines[rows] = (num / den).expand(len(rows), -1)
        if handle_zero_tail:
            lengths = m[rows].sum(-1)
            ordered = lengths.sort().values
            longest, second = int(ordered[-1]), int(ordered[-2])
            at_longest = (lengths == longest).nonzero().flatten()
            if at_longest.numel() == 1 and longest > second:
                baselines[rows[int(at_longest[0])], second:] = 0.0
    return (returns - baselines) * m, returns


# ----------------------------------------------------------------- reference


def test_reference_hand_case():
    """Two answers of two tokens, all valid. Answer 0: pi = (1/2, 1/4), sum p^2 = (1/2,
    1/4), rewards (0, 1); answer 1: pi = (1, 1) with sum p^2 = 1 (w = 0: a sure token adds
    no variance), rewards (0, -1)."""
    rewards = torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=F64)
    old_logp = torch.tensor([[0.5, 0.25], [1.0, 1.0]], dtype=F64).log()
    log_sum_p2 = torch.tensor([[0.5, 0.25], [1.0, 1.0]], dtype=F64).log()
    mask = torch.ones(2, 2, dtype=torch.bool)
    adv, ret = reference.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 2, eps=0.0)
    # w0 = (1 - 1 + 0.5, 1 - 0.5 + 0.25) = (0.5, 0.75): W0 = (0.5, 1.25); W1 = (0, 0)
    # G0 = (1, 1), G1 = (-1, -1): B = (1 * 0.5 / 0.5, 1 * 1.25 / 1.25) = (1, 1)
    assert ret.tolist() == [[1.0, 1.0], [-1.0, -1.0]]
    assert adv.tolist() == [[0.0, 0.0], [-2.0, -2.0]]
    # Answer 1 at pi = 1/2 and sum p^2 = 1 (w = 1), weighted by rho^2 = 4: W1 = (4, 8),
    # B = ((0.5 - 4) / 4.5, (1.25 - 8) / 9.25)
    rho = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=F64)
    old_logp[1] = math.log(0.5)
    adv, _ = reference.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 2, eps=0.0,
                                              rollout_is_weights=rho)
    b = [(0.5 - 4) / 4.5, (1.25 - 8) / 9.25]
    expected = [[1 - b[0], 1 - b[1]], [-1 - b[0], -1 - b[1]]]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=F64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("handle_zero_tail", [False, True])
@pytest.mark.parametrize("with_rho", [False, True])
@pytest.mark.parametrize("group_size", [1, 2, 5])
def test_reference_agrees_with_verl(handle_zero_tail, with_rho, group_size):
    """Right-padded answers (verl's zero tail cuts columns by length), one group with a
    unique longest answer, verl's epsilon; returns compared at the valid positions (verl
    leaves the later rewards' sum at masked ones, here 0)."""
    B, T = 4 * group_size, 23
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T  # the first group's longest, unique unless group_size is 1
    lengths[1:group_size] = lengths[1:group_size].clamp(max=T - 3)
    mask = torch.arange(T)[None] < lengths[:, None]
    rewards, mask, old_logp, log_sum_p2, rho = random_case(B, T, mask=mask)
    rho = rho if with_rho else None
    adv, ret = reference.optimal_token_baseline(
        rewards, mask, old_logp, log_sum_p2, group_size, rollout_is_weights=rho,
        handle_zero_tail=handle_zero_tail)
    index = [i // group_size for i in range(B)]
    their_adv, their_ret = verl_otb(rewards, mask, old_logp, log_sum_p2.exp(), index, rho,
                                    handle_zero_tail)
    torch.testing.assert_close(adv, their_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret[mask], their_ret[mask], rtol=1e-12, atol=1e-12)
    assert (ret[~mask] == 0).all() and (adv[~mask] == 0).all()


def test_zero_tail_changes_only_the_unique_longest_answer():
    T = 9
    mask = torch.arange(T)[None] < torch.tensor([[9], [5], [5], [9], [4], [2]])
    rewards, mask, old_logp, log_sum_p2, _ = random_case(6, T, mask=mask)
    plain = reference.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 3)[0]
    tail = reference.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 3,
                                            handle_zero_tail=True)[0]
    returns = reference.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 3)[1]
    changed = (plain != tail).nonzero().tolist()
    assert {tuple(c) for c in changed} <= {(0, t) for t in range(5, 9)} | {(3, t)
                                                                          for t in range(4, 9)}
    assert torch.equal(tail[0, 5:], returns[0, 5:]) and torch.equal(tail[3, 4:], returns[3, 4:])


# ----------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size, n_groups, T", [(1, 5, 40), (3, 4, 300), (4, 3, 257),
                                                      (8, 2, 1), (16, 2, 70), (5, 1, 513)])
@pytest.mark.parametrize("options", [{}, {"rho": True}, {"handle_zero_tail": True, "eps": 1e-3}])
def test_matches_reference(dtype, group_size, n_groups, T, options, poisoned):
    """Random masks of every kind (holes, left / right padding, all masked, one token);
    T across several column blocks, ragged groups (3, 5); the reference on the same rounded
    inputs in float64."""
    options = dict(options)
    rewards, mask, old_logp, log_sum_p2, rho = random_case(group_size * n_groups, T, dtype)
    rho = rho if options.pop("rho", False) else None
    out = rlhf_fast.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, group_size,
                                           rollout_is_weights=rho, **options)
    ref = reference.optimal_token_baseline(
        rewards.double(), mask, old_logp.double(), log_sum_p2.double(), group_size,
        rollout_is_weights=None if rho is None else rho.double(), **options)
    for name, a, b in zip(("advantages", "returns"), out, ref):
        assert a.dtype == (F64 if dtype == F64 else torch.float32)
        assert rel_err(a, b) < TOL[dtype], name
        assert (a[mask == 0] == 0).all(), name


def test_kernel_runs_and_equals_the_reference_bit_for_bit_in_float64(monkeypatch):
    """The same sums in the same order: equal in float64 (and the Triton path taken)."""
    rewards, mask, old_logp, log_sum_p2, rho = random_case(12, 300)
    expected = reference.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 4,
                                                rollout_is_weights=rho)

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(reference, "optimal_token_baseline", fail)
    out = rlhf_fast.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 4,
                                           rollout_is_weights=rho)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_chained_after_logprobs_return_sum_p2():
    """The inputs as a trainer makes them: logprobs(..., return_sum_p2=True) of the sampled
    tokens, then the baseline; equal to verl's formula on softmax probabilities."""
    B, T, V = 6, 11, 30
    logits = torch.randn(B, T, V, dtype=F64) * 2
    tokens = torch.randint(0, V, (B, T))
    old_logp, log_sum_p2 = rlhf_fast.logprobs(logits, tokens, return_sum_p2=True)
    mask = random_mask(B, T)
    rewards = torch.randn(B, T, dtype=F64)
    adv, _ = rlhf_fast.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 3)
    probs = torch.softmax(logits, -1)
    their, _ = verl_otb(rewards, mask, probs.gather(-1, tokens[..., None])[..., 0].log(),
                        (probs**2).sum(-1), [i // 3 for i in range(B)])
    assert rel_err(adv, their) < 1e-12


@pytest.mark.parametrize("B, T", [(0, 5), (4, 0), (0, 0)])
def test_empty(B, T):
    rewards, mask, old_logp, log_sum_p2, _ = random_case(B, T)
    adv, ret = rlhf_fast.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 2)
    assert adv.shape == ret.shape == (B, T)


def test_nan_stays_in_its_group_and_masked_entries_are_never_read():
    full = torch.ones(9, 20, dtype=torch.bool)
    rewards, mask, old_logp, log_sum_p2, _ = random_case(9, 20, mask=full.clone())
    clean = rlhf_fast.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 3)
    mask[4:6, 15:] = False
    poisoned = [t.clone() for t in (rewards, old_logp, log_sum_p2)]
    for t in poisoned:
        t[4:6, 15:] = float("nan")  # masked
    holes = rlhf_fast.optimal_token_baseline(poisoned[0], mask, *poisoned[1:], 3)
    expected = reference.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 3)
    for a, b in zip(holes, expected):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 1e-12
    rewards[1, 10] = float("nan")  # valid: group 0 (rows 0-2) only
    out = rlhf_fast.optimal_token_baseline(rewards, full, old_logp, log_sum_p2, 3)
    assert out[0][:3, :11].isnan().all()
    for a, b in zip(out, clean):
        assert torch.equal(a[3:], b[3:])


def bad_inputs():
    r = torch.zeros(4, 5)
    m = torch.ones(4, 5, dtype=torch.bool)
    ok = dict(rewards=r, mask=m, old_logp=r, log_sum_p2=r, group_size=2)
    yield ok | dict(rewards=torch.zeros(4)), ValueError, r"rewards must have shape \[B, T\]"
    yield ok | dict(mask=m[:, :4]), ValueError, "mask must have the shape of rewards"
    yield ok | dict(old_logp=r[:, :4]), ValueError, "old_logp must have the shape of rewards"
    yield ok | dict(log_sum_p2=r.long()), TypeError, "log_sum_p2"
    yield (ok | dict(rollout_is_weights=r[:3]), ValueError,
           "rollout_is_weights must have the shape of rewards")
    yield ok | dict(group_size=3), ValueError, "group_size must be an int >= 1 dividing"
    yield ok | dict(group_size=0), ValueError, "group_size must be an int >= 1 dividing"
    yield ok | dict(group_size=2.0), TypeError, "group_size"
    yield ok | dict(eps=0.0), ValueError, "eps must be a finite float > 0"
    yield ok | dict(handle_zero_tail=1), TypeError, "handle_zero_tail must be a bool"


@pytest.mark.parametrize("kwargs, error, match", list(bad_inputs()))
def test_bad_inputs_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        rlhf_fast.optimal_token_baseline(**kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_outputs_are_detached(monkeypatch, backend):
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    rewards, mask, old_logp, log_sum_p2, _ = random_case(4, 6)
    rewards.requires_grad_()
    adv, ret = rlhf_fast.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 2)
    assert not adv.requires_grad and not ret.requires_grad


def test_path_weights_keep_their_precision_where_the_token_is_nearly_certain():
    """pi_y = exp(old_logp) near 1 (two outcomes, 1 - pi_y = 1e-4): w = (1 - pi)^2 +
    (sum pi^2 - pi^2) = 2e-8, which 1 - 2 pi + sum pi^2 rounds away in fp32; a group of
    one valid row reads it through G W / (W + eps)."""
    T = 6
    rest = torch.full((2, T), 1e-4, dtype=F64)
    old_logp = torch.log1p(-rest)
    log_sum_p2 = torch.log((1 - rest) ** 2 + rest**2)
    rewards = torch.zeros(2, T, dtype=F64)
    rewards[0, -1] = 1.0
    mask = torch.tensor([[True] * T, [False] * T])
    inputs = [x.float() for x in (rewards, old_logp, log_sum_p2)]
    ref = reference.optimal_token_baseline(*[x.double() for x in inputs[:1]], mask,
                                           *[x.double() for x in inputs[1:]], 2)
    out = rlhf_fast.optimal_token_baseline(inputs[0], mask, *inputs[1:], 2)
    for name, a, b in zip(("advantages", "returns"), out, ref):
        assert rel_err(a, b) < 1e-5, name
