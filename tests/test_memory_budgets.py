"""Peak extra memory of the launcher paths at the headline shapes, counted on meta tensors
(`rlhf_fast.benchmarks.memory`): each within the bound the README documents."""

import pytest
import torch

from rlhf_fast.benchmarks import memory
from rlhf_fast.ops import linear_ppo_loss as linear_ppo_op


@pytest.mark.parametrize("name", list(memory.CASES))
def test_peak_extra_memory_within_the_documented_bound(name):
    case, bound, _ = memory.CASES[name]
    assert memory.peak_bytes(case()) <= bound


def test_the_headline_peaks_measured_here():
    """The figures the README quotes: a change that moves them shows here first."""
    peaks = {row["case"].split(",")[0]: row["peak_bytes"] for row in memory.table()}
    assert 2 * 8192 * 151936 < peaks["logprobs fwd+bwd"] < 2 * 8192 * 151936 + 64 * 8192
    assert peaks["logprobs fwd+bwd inplace_backward"] < 64 * 8192
    # one logits chunk, not two; the fp32 d weight and its rounding, not 5 GB of copies
    assert 1.5e9 < peaks["linear_logprobs fwd+bwd"] < 1.53e9
    assert 3.2e9 < peaks["linear_ppo_loss fwd+bwd"] < 3.23e9


def test_peak_memory_by_hand():
    with memory.PeakMemory() as peak:
        a = torch.empty(1000, device="meta")               # 4000 live
        b = torch.empty(500, dtype=torch.float64, device="meta")  # 8000
        del a                                              # 4000
        c = b.view(250, 2) * 2                             # 8000
        d = c.add_(1)                                      # in place: nothing new
    assert peak.peak == 8000 and d is c


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_gradients_round_once_chunk_by_chunk(monkeypatch, dtype):
    """linear_ppo_loss's backward scales its saved gradients a chunk of rows at a time
    (3 rows here), each element rounded once from its fp32 product, as a whole fp32 copy
    would be."""
    monkeypatch.setattr(linear_ppo_op, "CHUNK_ELEMENTS", 3 * 7)
    grad = torch.randn(10, 7, dtype=torch.float64).to(dtype)
    scale = torch.tensor(1 / 3)
    expected = (grad.float() * scale).to(dtype)
    assert torch.equal(linear_ppo_op.scaled(grad, scale), expected)
    bias = torch.randn(11).to(dtype)
    assert torch.equal(linear_ppo_op.scaled(bias, scale), (bias.float() * scale).to(dtype))
