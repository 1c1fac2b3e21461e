"""Peak extra memory of the launcher paths at the headline shapes, counted on meta tensors
(`rlhf_fast.benchmarks.memory`): each within the bound the README documents."""

from pathlib import Path

import pytest
import torch

from rlhf_fast.benchmarks import memory
from rlhf_fast.ops import linear_ppo_loss as linear_ppo_op

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def rows():
    return memory.table()


@pytest.fixture(scope="module")
def peaks(rows):
    return {row["case"]: row["peak_bytes"] for row in rows}


@pytest.mark.parametrize("name", list(memory.CASES))
def test_peak_extra_memory_within_the_documented_bound(rows, name):
    (row,) = (row for row in rows if row["case"] == name)
    assert row["peak_bytes"] <= row["bound_bytes"], row


def test_the_headline_peaks_measured_here(peaks):
    """The figures the README quotes: a change that moves them shows here first."""
    n, v = 8192, 151936
    assert 2 * n * v < peaks[f"logprobs fwd+bwd, [{n}, {v}] bf16"] < 2 * n * v + 64 * n
    assert peaks[f"logprobs fwd+bwd inplace_backward, [{n}, {v}] bf16"] < 64 * n
    # one logits chunk, not two; the fp32 d weight and its rounding, not 5 GB of copies
    assert 1.5e9 < peaks["linear_logprobs fwd+bwd, N 8192, D 4096, V 128256 bf16"] < 1.53e9
    assert 3.2e9 < peaks["linear_ppo_loss fwd+bwd, N 8192, D 4096, V 128256 bf16"] < 3.23e9


def test_the_readme_quotes_the_table(rows):
    """README.md's memory table is the one `python -m rlhf_fast.benchmarks.memory`
    prints (`memory.markdown`): regenerate it there when a figure moves."""
    assert memory.markdown(rows) in README.read_text(encoding="utf-8")


def test_peak_memory_by_hand():
    with memory.PeakMemory() as peak:
        a = torch.empty(1000, device="meta")               # 4000 live
        b = torch.empty(500, dtype=torch.float64, device="meta")  # 8000
        del a                                              # 4000
        c = b.view(250, 2) * 2                             # 8000
        d = c.add_(1)                                      # in place: nothing new
    assert peak.peak == 8000 and d is c


def _addresses(tensors):
    return {t.untyped_storage()._cdata for t in tensors}


@pytest.mark.parametrize("made", ["before the block", "inside the block"])
def test_a_storage_at_a_freed_storages_address_counts(made):
    """Storages are known by identity, not address: free tensors (made before the block,
    so never counted, or inside it) and allocate as many of the same size, which the
    allocator puts partly at the freed addresses; each new one counts."""
    k, size = 64, 4000
    for _ in range(5):  # until the allocator reuses an address (the first try, in practice)
        if made == "before the block":
            old = [torch.empty(size // 4, device="meta") for _ in range(k)]
        with memory.PeakMemory() as peak:
            if made == "inside the block":
                old = [torch.empty(size // 4, device="meta") for _ in range(k)]
            freed = _addresses(old)
            del old
            new = [torch.empty(size // 4, device="meta") for _ in range(k)]
            reused = freed & _addresses(new)
        if reused:
            break
    assert reused, "no address reused: the test shows nothing"
    assert peak.current == k * size
    assert peak.peak == k * size  # the freed ones died before the new ones were made


def test_sliced_logits_cost_twice_the_shifted_labels(peaks):
    """`logits[:, :-1]`'s backward pads the slice's gradient into a second full-size one
    (the regression shifted labels removed from the trainers): it must stay visible."""
    sliced = peaks["logprobs fwd+bwd, logits[:, :-1], [8, 1024, 151936] bf16"]
    shifted = peaks["logprobs fwd+bwd, shifted labels, [8, 1024, 151936] bf16"]
    assert 2 * 8 * 1024 * 151936 < shifted < 2 * 8 * 1024 * 151936 + 64 * 8192
    assert 1.99 < sliced / shifted < 2.01


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
