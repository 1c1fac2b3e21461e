"""The benchmark suites' providers, gated in process on the CPU.

The peers' adapters (Liger-Kernel's cross entropy, fused linear cross entropy and GRPO
loss) run here in the Triton interpreter (TRITON_INTERPRET=1, set by conftest), so a
wrong adapter (a sign, a reduction, a clip bound) fails CI rather than showing up as a
"wrong" row on someone's GPU. Each must pass its suite's float64 gate and leave the
case's inputs as they were (the peers that write into their input get copies).
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_fast.benchmarks import (
    bench_grpo,
    bench_linear_dpo,
    bench_linear_grpo,
    bench_linear_logprobs,
    bench_logprobs,
    harness,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("mode", bench_logprobs.MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_liger_cross_entropy_adapter_passes_the_logprobs_gate(mode: str, dtype: torch.dtype):
    shape = (96, 1031)
    case = bench_logprobs.Case(shape, dtype, False, mode, "liger")
    inp = bench_logprobs.make_inputs(shape, dtype, CPU)
    before = inp.logits.clone()
    fn = bench_logprobs.provider_fn("liger", CPU)
    ok, errors = bench_logprobs._gate(case, inp, fn)
    assert ok, errors
    assert set(errors) == ({"logp"} if mode == "fwd" else {"logp", "grad"})
    timed, setup = bench_logprobs._timed(case, inp, fn)
    assert setup is not None  # liger writes into its input: a fresh copy per call
    timed(setup())
    assert torch.equal(inp.logits, before)


def test_liger_cross_entropy_has_no_entropy_row():
    row, outcome = bench_logprobs.run_case(
        bench_logprobs.Case((8, 16), torch.float32, True, "fwd", "liger"),
        _Session(), benchmark=None,
    )
    assert outcome == "skip"
    assert row["status"] == "skipped: Liger-Kernel's cross entropy has no entropy output"


@pytest.mark.parametrize("mode", bench_linear_logprobs.MODES)
def test_liger_fused_linear_adapter_passes_the_linear_logprobs_gate(mode: str):
    shape = bench_linear_logprobs.QUICK_SHAPES[-1]
    case = bench_linear_logprobs.Case(shape, mode, "liger")
    assert bench_linear_logprobs.unavailable("liger", CPU) is None
    inp = bench_linear_logprobs.make_inputs(shape, CPU)
    fn = bench_linear_logprobs.provider_fn("liger", mode, CPU)
    ok, errors = bench_linear_logprobs._gate(case, inp, fn)
    assert ok, errors
    if mode == "fwd+bwd":
        assert {"grad_hidden", "grad_weight"} <= set(errors)


@pytest.mark.parametrize("mode", bench_grpo.MODES)
@pytest.mark.parametrize("provider", ["rlhf_fast", "rlhf_fast-inplace", "liger", "eager"])
def test_grpo_providers_pass_the_gate_and_leave_the_logits_alone(provider: str, mode: str):
    shape = bench_grpo.QUICK_SHAPES[-1]
    case = bench_grpo.Case(shape, mode, provider)
    inp = bench_grpo.make_inputs(shape, CPU)
    assert 0 < int(inp.mask.sum()) < inp.mask.numel()  # padding present
    before = inp.logits.clone()
    fn = bench_grpo.provider_fn(provider, mode, CPU)
    ok, errors = bench_grpo._gate(case, inp, fn)
    assert ok, errors
    assert set(errors) == ({"loss"} if mode == "fwd" else {"loss", "grad"})
    timed, setup = bench_grpo._timed(case, inp, fn)
    out = timed(setup()) if setup is not None else timed()
    if mode == "fwd":
        assert out.shape == ()
    else:
        assert out[0].shape == case.logits_shape
    assert torch.equal(inp.logits, before)


@pytest.mark.parametrize("bug", ["symmetric clip", "padding in the mean"])
def test_grpo_gate_rejects_a_wrong_provider(bug: str):
    """The gate can fail: the eager loss without clip-higher, or averaging over the
    padding too, is reported wrong in both modes."""
    shape = bench_grpo.QUICK_SHAPES[-1]
    inp = bench_grpo.make_inputs(shape, CPU)
    high = bench_grpo.CLIP_LOW if bug == "symmetric clip" else bench_grpo.CLIP_HIGH

    def buggy(logits, ids, mask, old_logp, ref_logp, advantages):
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids.unsqueeze(-1))[..., 0]
        ratio = torch.exp(logp - old_logp)
        adv = advantages.unsqueeze(1)
        clipped = torch.clamp(ratio, 1 - bench_grpo.CLIP_LOW, 1 + high)
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        per_token = -torch.min(ratio * adv, clipped * adv) + bench_grpo.BETA * kl
        if bug == "padding in the mean":
            return per_token.mean()
        return (per_token * mask).sum() / mask.sum()

    for mode in bench_grpo.MODES:
        ok, errors = bench_grpo._gate(bench_grpo.Case(shape, mode, "eager"), inp, buggy)
        assert not ok, errors


def test_grpo_inputs_clip_at_both_bounds_but_never_sit_on_one():
    inp = bench_grpo.make_inputs(bench_grpo.QUICK_SHAPES[-1], CPU)
    log_ratio = inp.logp64 - inp.old_logp.double()
    ratio = log_ratio.exp()
    assert (ratio < 1 - bench_grpo.CLIP_LOW).float().mean() > 0.05
    assert (ratio > 1 + bench_grpo.CLIP_HIGH).float().mean() > 0.05
    for edge in (math.log(1 - bench_grpo.CLIP_LOW), math.log(1 + bench_grpo.CLIP_HIGH)):
        assert (log_ratio - edge).abs().min() >= bench_grpo.CLIP_EDGE_MARGIN - 1e-6
    assert (inp.advantages > 0).any() and (inp.advantages < 0).any()


@pytest.mark.parametrize("mode", bench_linear_grpo.MODES)
@pytest.mark.parametrize("provider", ["rlhf_fast", "liger", "eager"])
@pytest.mark.parametrize("suite", [bench_linear_grpo, bench_linear_dpo],
                         ids=["linear_grpo", "linear_dpo"])
def test_hidden_state_loss_providers_pass_the_gate(suite, provider: str, mode: str):
    """rlhf_fast.linear_ppo_loss / linear_dpo_loss, Liger-Kernel's chunked fused linear
    GRPO / DPO losses (pure PyTorch: no interpreter needed; its DPO runs the reference
    model inside) and eager on materialised logits, against float64."""
    shape = suite.QUICK_SHAPES[-1]
    assert suite.unavailable(provider, CPU) is None
    inp = suite.make_inputs(shape, CPU)
    fn = suite.provider_fn(provider, mode, CPU)
    ok, errors = bench_linear_grpo.gate_loss_from_hidden(suite.Case(shape, mode, provider),
                                                         inp, fn)
    assert ok, errors
    assert set(errors) == (
        {"loss"} if mode == "fwd" else {"loss", "grad_hidden", "grad_weight"}
    )


def test_linear_grpo_gate_rejects_a_loss_averaged_over_the_padding():
    shape = bench_linear_grpo.QUICK_SHAPES[-1]
    inp = bench_linear_grpo.make_inputs(shape, CPU)

    def padded_mean(hidden, weight, ids, mask, old_logp, ref_logp, advantages):
        logp = bench_grpo.eager_token_logps(hidden @ weight.T, ids)
        everything = torch.ones_like(mask)
        return bench_grpo.eager_grpo_objective(logp, everything, old_logp, ref_logp, advantages)

    for mode in bench_linear_grpo.MODES:
        case = bench_linear_grpo.Case(shape, mode, "eager")
        ok, errors = bench_linear_grpo.gate_loss_from_hidden(case, inp, padded_mean)
        assert not ok, errors


def test_linear_dpo_gate_rejects_liger_misconfigured_to_average_log_probs():
    """The gate catches a peer set up for another objective: Liger's DPO loss with
    length-averaged sequence log-probs (its ``average_log_prob=True``) is not sigmoid DPO
    on summed log-probs."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    shape = bench_linear_dpo.QUICK_SHAPES[-1]
    inp = bench_linear_dpo.make_inputs(shape, CPU)
    loss_fn = LigerFusedLinearDPOLoss(beta=bench_linear_dpo.BETA, compiled=False,
                                      average_log_prob=True)

    def averaged(hidden, weight, labels, ref_hidden, ref_weight):
        return loss_fn(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)[0]

    for mode in bench_linear_dpo.MODES:
        case = bench_linear_dpo.Case(shape, mode, "liger")
        ok, errors = bench_linear_grpo.gate_loss_from_hidden(case, inp, averaged)
        assert not ok, errors


def test_peer_entry_says_why_a_peer_cannot_run(monkeypatch: pytest.MonkeyPatch):
    entry, reason = harness.peer_entry("liger", "liger_kernel.transformers",
                                       "LigerCrossEntropyLoss", CPU)
    assert entry is not None and reason is None  # interpreter on: CI can gate it
    monkeypatch.delenv("TRITON_INTERPRET")
    assert harness.peer_entry(
        "liger", "liger_kernel.transformers", "LigerCrossEntropyLoss", CPU
    ) == (None, "liger_kernel runs on CUDA (or TRITON_INTERPRET=1) only")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert harness.peer_entry("cce", "no_such_module_cce", "linear_cross_entropy", CPU) == (
        None, "no_such_module_cce not installed")


class _Session:
    """The bench_session fields a skipped case reads."""

    device = CPU
    copy_bandwidth = None
