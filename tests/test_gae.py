"""gae, discounted_returns, group_advantages, masked_mean, masked_whiten: the Triton kernels
(through the interpreter) against the reference, and the reference against independent math."""

import pytest
import torch

import rlhf_fast
from helpers import rel_err
from rlhf_fast import reference
from rlhf_fast.kernels import gae as kernel

BLOCK_T = kernel.MAX_BLOCK_T
STATS = kernel.STATS_BLOCK
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}
GAMMA_LAM = [(0.99, 0.95), (1.0, 1.0), (0.0, 0.95), (0.9, 0.0), (1.0, 0.0), (0.0, 0.0)]


def random_mask(B, T):
    """Rows of every kind: holes, left padding, right padding, both + holes, all masked,
    a single valid token, all valid (in random order)."""
    mask = torch.rand(B, T) < 0.75
    pos = torch.arange(T)
    for b in range(B):
        kind = b % 7
        cut = int(torch.randint(0, T + 1, ()))
        if kind == 1:
            mask[b] = pos >= cut
        elif kind == 2:
            mask[b] = pos < cut
        elif kind == 3:
            mask[b] = False
        elif kind == 4:
            mask[b] = False
            mask[b, int(torch.randint(0, max(T, 1), ())) % max(T, 1)] = T > 0
        elif kind == 5:
            mask[b] = True
        elif kind == 6:
            mask[b] &= (pos >= cut // 2) & (pos < (cut + T) // 2 + 1)
    return mask[torch.randperm(B)] if B else mask


def random_gae_case(B, T, dtype=torch.float32, bootstrap=True):
    rewards = torch.randn(B, T, dtype=torch.float64).to(dtype)
    values = torch.randn(B, T, dtype=torch.float64).to(dtype)
    last_value = torch.randn(B, dtype=torch.float64).to(dtype) if bootstrap else None
    return rewards, values, random_mask(B, T), last_value


def gae_ref64(rewards, values, mask, last_value, gamma, lam):
    """The reference in float64 on the same (rounded) inputs."""
    lv = None if last_value is None else last_value.double()
    return reference.gae(
        rewards.double(), values.double(), mask, gamma=gamma, lam=lam, last_value=lv
    )


def gae_direct(rewards, values, mask, gamma, lam, last_value=None):
    """Independent O(T^2) formula on Python floats: over the valid positions t_0 < t_1 < ...
    of a row, A_{t_j} = sum_k (gamma lam)^k delta_{t_(j+k)} with
    delta_{t_i} = r_{t_i} + gamma V_{t_(i+1)} - V_{t_i} (V after the last: last_value or 0)."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        r, v = rewards[b].tolist(), values[b].tolist()
        idx = [t for t in range(T) if mask[b, t]]
        tail = 0.0 if last_value is None else float(last_value[b])
        v_after = [v[idx[i + 1]] if i + 1 < len(idx) else tail for i in range(len(idx))]
        deltas = [r[t] + gamma * v_after[i] - v[t] for i, t in enumerate(idx)]
        for j, t in enumerate(idx):
            adv[b, t] = sum((gamma * lam) ** k * d for k, d in enumerate(deltas[j:]))
    return adv


def assert_gae_close(out, ref, dtype):
    for name, o, r in zip(("advantages", "returns"), out, ref):
        err = rel_err(o, r)
        assert err < TOL[dtype], f"{name}: relative error {err:.3g} >= {TOL[dtype]}"


# ----------------------------------------------------------------- reference vs hand math


def test_reference_gae_hand_case():
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0, 1.5]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True]])
    adv, ret = reference.gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # t = 2: delta = 3 - 1.5 = 1.5. t = 0 links to t = 2: delta = 1 + 0.5 * 1.5 - 0.5 = 1.25,
    # A = 1.25 + 0.25 * 1.5 = 1.625.
    assert adv.tolist() == [[1.625, 0.0, 1.5]]
    assert ret.tolist() == [[2.125, 0.0, 3.0]]


@pytest.mark.parametrize("gamma, lam", GAMMA_LAM)
def test_reference_gae_matches_direct_sum(gamma, lam):
    rewards, values, mask, last_value = random_gae_case(9, 11, torch.float64)
    for lv in (None, last_value):
        adv, ret = reference.gae(rewards, values, mask, gamma=gamma, lam=lam, last_value=lv)
        direct = gae_direct(rewards, values, mask, gamma, lam, lv)
        assert torch.allclose(adv, direct, rtol=1e-12, atol=1e-12)
        assert torch.allclose(ret, torch.where(mask, direct + values, 0.0), atol=1e-12)


def test_reference_discounted_returns_hand_case():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 0]])
    out = reference.discounted_returns(rewards, mask, 0.5, torch.tensor([8.0, 0.0]))
    assert out.tolist() == [[0.0, 5.5, 7.0, 8.0], [1.5, 0.0, 1.0, 0.0]]


# ----------------------------------------------------------------- gae kernel


def test_gae_hand_case():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    adv, ret = rlhf_fast.gae(rewards, values, torch.tensor([[1, 0, 1]]), gamma=0.5, lam=0.5)
    assert adv.tolist() == [[1.625, 0.0, 1.5]] and ret.tolist() == [[2.125, 0.0, 3.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma, lam", GAMMA_LAM)
def test_gae_matches_reference(dtype, gamma, lam, poisoned_empty):
    rewards, values, mask, last_value = random_gae_case(9, 61, dtype)
    for lv in (None, last_value):
        out = rlhf_fast.gae(rewards, values, mask, gamma=gamma, lam=lam, last_value=lv)
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert out[0].dtype == out[1].dtype == out_dtype
        assert_gae_close(out, gae_ref64(rewards, values, mask, lv, gamma, lam), dtype)
        assert (out[0][~mask] == 0).all() and (out[1][~mask] == 0).all()


def test_gae_matches_direct_sum_float64():
    rewards, values, mask, last_value = random_gae_case(7, 23, torch.float64)
    adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=0.97, lam=0.9, last_value=last_value)
    direct = gae_direct(rewards, values, mask, 0.97, 0.9, last_value)
    assert rel_err(adv, direct) < 1e-12
    assert rel_err(ret, torch.where(mask, direct + values, 0.0)) < 1e-12


@pytest.mark.parametrize(
    "B, T",
    [(0, 7), (3, 0), (1, 1), (6, 1), (5, 2), (5, 13), (4, 15), (4, 16), (4, 17), (3, 97),
     (2, BLOCK_T - 1), (2, BLOCK_T), (2, BLOCK_T + 1)],
)
def test_gae_edge_shapes(B, T, poisoned_empty):
    # float64 through the kernel: these cases test indexing, carries and masking.
    rewards, values, mask, last_value = random_gae_case(B, T, torch.float64)
    out = rlhf_fast.gae(rewards, values, mask, gamma=0.98, lam=0.9, last_value=last_value)
    assert out[0].shape == out[1].shape == (B, T)
    assert_gae_close(out, gae_ref64(rewards, values, mask, last_value, 0.98, 0.9), torch.float64)


def test_gae_long_row():
    rewards, values, _, last_value = random_gae_case(1, 5000)
    mask = torch.rand(1, 5000) < 0.9
    mask[0, :37] = False  # left padding, holes, right padding
    mask[0, -300:] = False
    for gamma, lam in ((0.999, 0.97), (1.0, 1.0)):
        out = rlhf_fast.gae(rewards, values, mask, gamma=gamma, lam=lam, last_value=last_value)
        ref = gae_ref64(rewards, values, mask, last_value, gamma, lam)
        assert_gae_close(out, ref, torch.float32)


def test_gae_single_token_and_all_masked_rows():
    rewards, values, _, last_value = random_gae_case(3, 40, torch.float64)
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[1, 17] = True
    mask[2, 39] = True
    adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=0.9, lam=0.8, last_value=last_value)
    assert (adv[0] == 0).all() and (ret[0] == 0).all()
    for b, t in ((1, 17), (2, 39)):
        expected = rewards[b, t] + 0.9 * last_value[b] - values[b, t]
        assert adv[b, t].item() == pytest.approx(expected.item(), rel=1e-13, abs=1e-13)
        assert ret[b, t].item() == pytest.approx((expected + values[b, t]).item(), abs=1e-13)
        assert adv[b].count_nonzero() == 1


def test_gae_mixed_input_dtypes_and_mask_dtypes():
    rewards, values, mask, last_value = random_gae_case(6, 30)
    rewards = rewards.bfloat16()
    ref = gae_ref64(rewards, values, mask, last_value.half(), 0.95, 0.9)
    outs = []
    for m in (mask, mask.to(torch.uint8), mask.int(), mask.long(), mask.float(), mask.double()):
        outs.append(rlhf_fast.gae(rewards, values, m, gamma=0.95, lam=0.9,
                                  last_value=last_value.half()))
    assert outs[0][0].dtype == torch.float32
    assert_gae_close(outs[0], ref, torch.float32)
    for out in outs[1:]:
        assert torch.equal(out[0], outs[0][0]) and torch.equal(out[1], outs[0][1])


def test_gae_non_contiguous_inputs():
    rewards, values, mask, _ = random_gae_case(5, 40)
    r, v, m = rewards.t().contiguous().t(), values[:, ::2], mask[:, ::2]
    out = rlhf_fast.gae(r[:, ::2], v, m, gamma=0.9, lam=0.95)
    assert_gae_close(out, gae_ref64(r[:, ::2], v, m, None, 0.9, 0.95), torch.float32)


def test_gae_masked_entries_are_never_read():
    rewards, values, mask, last_value = random_gae_case(8, 50)
    clean = rlhf_fast.gae(rewards, values, mask, gamma=0.9, lam=0.9, last_value=last_value)
    rewards[~mask] = float("nan")
    values[~mask] = float("inf")
    dirty = rlhf_fast.gae(rewards, values, mask, gamma=0.9, lam=0.9, last_value=last_value)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_gae_nonfinite_stays_in_its_row(bad):
    rewards, values, _, last_value = random_gae_case(6, 40)
    mask = torch.ones(6, 40, dtype=torch.bool)
    clean = rlhf_fast.gae(rewards, values, mask, gamma=0.9, lam=0.9, last_value=last_value)
    values[2, 20] = bad
    out = rlhf_fast.gae(rewards, values, mask, gamma=0.9, lam=0.9, last_value=last_value)
    others = [0, 1, 3, 4, 5]
    for o, c in zip(out, clean):
        assert torch.equal(o[others], c[others])
        assert torch.equal(o[2, 21:], c[2, 21:])  # later positions do not depend on it
        assert not torch.isfinite(o[2, :20]).any()


def test_gae_batch_invariance():
    """A row's outputs are bit-identical whatever the other rows and B are."""
    rewards, values, mask, last_value = random_gae_case(16, 150)

    def outputs(rows):
        return rlhf_fast.gae(
            rewards[rows], values[rows], mask[rows], gamma=0.99, lam=0.95,
            last_value=last_value[rows],
        )

    full = outputs(slice(0, 16))
    for rows in (slice(0, 1), slice(5, 6), slice(3, 11)):
        for a, b in zip(outputs(rows), full):
            assert torch.equal(a, b[rows])
    shuffled = torch.randperm(16)
    for a, b in zip(outputs(shuffled), full):
        assert torch.equal(a, b[shuffled])


def test_gae_outputs_are_detached(monkeypatch):
    rewards, values, mask, last_value = random_gae_case(3, 9)
    values.requires_grad_()
    for backend in ("triton", "torch"):
        monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
        adv, ret = rlhf_fast.gae(rewards, values, mask, last_value=last_value)
        assert not adv.requires_grad and not ret.requires_grad


# ----------------------------------------------------------------- discounted returns


def test_discounted_returns_hand_case(poisoned_empty):
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.int8)
    out = rlhf_fast.discounted_returns(rewards, mask, 0.5, last_value=torch.tensor([8.0, 0.0]))
    assert out.tolist() == [[0.0, 5.5, 7.0, 8.0], [1.5, 0.0, 1.0, 0.0]]
    assert rlhf_fast.discounted_returns(rewards, mask).tolist() == [
        [0.0, 9.0, 7.0, 4.0], [2.0, 0.0, 1.0, 0.0]
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
def test_discounted_returns_matches_reference(dtype, gamma, poisoned_empty):
    rewards, values, mask, last_value = random_gae_case(9, 45, dtype)
    for lv in (None, last_value):
        out = rlhf_fast.discounted_returns(rewards, mask, gamma, lv)
        ref = reference.discounted_returns(
            rewards.double(), mask, gamma, None if lv is None else lv.double()
        )
        assert rel_err(out, ref) < TOL[dtype]
        # = the returns of GAE with lam = 1 and zero values
        _, ret = gae_ref64(rewards, torch.zeros_like(values), mask, lv, gamma, 1.0)
        assert rel_err(out, ret) < TOL[dtype]


def test_discounted_returns_edge_shapes():
    for B, T in ((0, 5), (2, 1), (3, BLOCK_T + 1)):
        rewards, _, mask, last_value = random_gae_case(B, T, torch.float64)
        out = rlhf_fast.discounted_returns(rewards, mask, 0.97, last_value)
        assert out.shape == (B, T)
        assert rel_err(out, reference.discounted_returns(rewards, mask, 0.97, last_value)) < 1e-12


# ----------------------------------------------------------------- group advantages


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


# ----------------------------------------------------------------- masked mean


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, STATS + 5), (2, 3, 5)])
def test_masked_mean_matches_reference(dtype, shape, poisoned_empty):
    x = (torch.randn(shape, dtype=torch.float64) + 0.5).to(dtype)
    mask = torch.rand(shape) < 0.6
    mask.view(-1)[0] = True
    out = rlhf_fast.masked_mean(x, mask)
    assert out.shape == () and out.dtype == reference.masked_mean(x, mask).dtype
    assert rel_err(out, reference.masked_mean(x.double(), mask)) < TOL[dtype]
    assert rel_err(out, x.double()[mask].mean()) < TOL[dtype]  # independent
    for dim in range(-len(shape), len(shape)):
        if x.numel() // x.shape[dim] > 64:
            continue  # one program per output: too many for the interpreter
        out = rlhf_fast.masked_mean(x, mask, dim)
        ref = reference.masked_mean(x.double(), mask, dim)
        assert out.shape == ref.shape
        assert torch.equal(out.isnan(), ref.isnan())  # slices without a valid entry
        ok = ~ref.isnan()
        assert rel_err(out[ok], ref[ok]) < TOL[dtype]


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


# ----------------------------------------------------------------- masked whiten


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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_huge_values_keep_finite_statistics(monkeypatch, backend, magnitude):
    """Squared deviations of |x| ~ 1e19 and more overflow fp32: the variance must not be
    formed as such (group_advantages and masked_whiten gave NaN or 0 there)."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    # groups of 1500 span two chunks of the group kernel; x spans several stats blocks
    scores = (torch.randn(3 * 1500, dtype=torch.float64) * magnitude + 2 * magnitude).float()
    out = rlhf_fast.group_advantages(scores, 1500)
    assert rel_err(out, reference.group_advantages(scores.double(), 1500)) < 1e-5
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


# ----------------------------------------------------------------- errors and dispatch


def gae_args(**overrides):
    args = {
        "rewards": torch.randn(3, 5), "values": torch.randn(3, 5),
        "mask": torch.ones(3, 5, dtype=torch.bool),
    }
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"rewards": [[1.0]]}, TypeError, "rewards must be a torch.Tensor"),
        ({"rewards": torch.ones(3, 5, dtype=torch.long)}, TypeError, "rewards must have dtype"),
        ({"values": torch.ones(3, 5, dtype=torch.int32)}, TypeError, "values must have dtype"),
        ({"mask": torch.ones(3, 5, dtype=torch.complex64)}, TypeError, "mask must have dtype"),
        ({"rewards": torch.randn(15)}, ValueError, r"rewards must have shape \[B, T\], got"),
        ({"values": torch.randn(3, 4)}, ValueError,
         r"values must have the shape of rewards \(3, 5\), got \(3, 4\)"),
        ({"mask": torch.ones(5, 3)}, ValueError, "mask must have the shape of rewards"),
        ({"values": torch.randn(3, 5, device="meta")}, ValueError, "values must be on"),
        ({"mask": torch.ones(3, 5, device="meta")}, ValueError, "mask must be on"),
        ({"last_value": torch.randn(5)}, ValueError,
         r"last_value must have shape \[B\] = \(3,\).*got \(5,\)"),
        ({"last_value": torch.zeros(3, dtype=torch.long)}, TypeError, "last_value must have"),
        ({"gamma": 1.5}, ValueError, r"gamma must be a float in \[0, 1\], got 1.5"),
        ({"gamma": -0.1}, ValueError, "gamma"),
        ({"gamma": float("nan")}, ValueError, "gamma"),
        ({"gamma": "0.9"}, TypeError, "gamma must be a float"),
        ({"lam": 2}, ValueError, r"lam must be a float in \[0, 1\], got 2"),
        ({"lam": None}, TypeError, "lam must be a float"),
        ({"gamma": 1e-300}, ValueError, "gamma must be representable in fp32"),
    ],
)
def test_gae_bad_inputs_raise_clear_errors(overrides, error, match):
    args = gae_args(**overrides)
    rewards, values, mask = args.pop("rewards"), args.pop("values"), args.pop("mask")
    with pytest.raises(error, match=match):
        rlhf_fast.gae(rewards, values, mask, **args)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mask": torch.ones(3, 4)}, ValueError, "mask must have the shape of rewards"),
        ({"gamma": 1.01}, ValueError, "gamma"),
        ({"last_value": torch.randn(3, 1)}, ValueError, "last_value must have shape"),
        ({"rewards": torch.randn(2, 3, 5)}, ValueError, "rewards must have shape"),
    ],
)
def test_discounted_returns_bad_inputs(kwargs, error, match):
    args = {"rewards": torch.randn(3, 5), "mask": torch.ones(3, 5)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rlhf_fast.discounted_returns(**args)


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


def test_backend_switch(monkeypatch):
    rewards, values, mask, last_value = random_gae_case(4, 30)
    x = torch.randn(4, 30)
    scores = torch.randn(8)

    def run_all():
        return (
            *rlhf_fast.gae(rewards, values, mask, gamma=0.9, last_value=last_value),
            rlhf_fast.discounted_returns(rewards, mask, 0.9, last_value),
            rlhf_fast.group_advantages(scores, 4),
            rlhf_fast.masked_mean(x, mask),
            rlhf_fast.masked_whiten(x, mask),
        )

    triton_out = run_all()
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    for a, b in zip(triton_out, run_all()):
        assert rel_err(a, b) < 1e-5
    # without the interpreter, CPU tensors take the reference path
    monkeypatch.delenv("RLHF_FAST_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for a, b in zip(triton_out, run_all()):
        assert rel_err(a, b) < 1e-5
