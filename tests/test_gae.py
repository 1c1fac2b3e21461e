"""rlhf_fast.gae: the Triton kernel (through the interpreter) against the reference, and the
reference against an independent O(T^2) formula."""

import pytest
import torch

import rlhf_fast
from helpers import gae_ref64, random_gae_case, rel_err
from rlhf_fast import reference
from rlhf_fast.kernels import gae as kernel

BLOCK_T = kernel.MAX_BLOCK_T
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}
GAMMA_LAM = [(0.99, 0.95), (1.0, 1.0), (0.0, 0.95), (0.9, 0.0), (1.0, 0.0), (0.0, 0.0)]


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


def gae_args(**overrides):
    args = {
        "rewards": torch.randn(3, 5), "values": torch.randn(3, 5),
        "mask": torch.ones(3, 5, dtype=torch.bool),
    }
    args.update(overrides)
    return args
