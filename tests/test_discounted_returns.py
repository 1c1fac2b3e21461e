"""rlhf_fast.discounted_returns: the GAE kernel with lambda 1 and no values, against the
reference, and the reference against hand math."""

import pytest
import torch

import rlhf_fast
from helpers import gae_ref64, random_gae_case, rel_err
from rlhf_fast import reference
from rlhf_fast.kernels import gae as kernel

BLOCK_T = kernel.MAX_BLOCK_T
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def test_reference_discounted_returns_hand_case():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 0]])
    out = reference.discounted_returns(rewards, mask, 0.5, torch.tensor([8.0, 0.0]))
    assert out.tolist() == [[0.0, 5.5, 7.0, 8.0], [1.5, 0.0, 1.0, 0.0]]


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
