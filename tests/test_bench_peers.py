"""The benchmark suites' providers, gated in process on the CPU.

The peers' adapters (Liger-Kernel's cross entropy, fused linear cross entropy and GRPO
loss) run here in the Triton interpreter (TRITON_INTERPRET=1, set by conftest), so a
wrong adapter (a sign, a reduction, a clip bound) fails CI rather than showing up as a
"wrong" row on someone's GPU. Each must pass its suite's float64 gate and leave the
case's inputs as they were (the peers that write into their input get copies).

TRL picks its own code by device: its Triton kernels on CUDA, PyTorch elsewhere. Its
adapters are gated on both: the fallback as the CPU runs it, and the kernels in the
interpreter, with TRL's device check made to accept the CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlhf_fast.benchmarks import (
    bench_cpo_loss,
    bench_gae,
    bench_group_advantages,
    bench_grpo,
    bench_kto_loss,
    bench_linear_dpo_loss,
    bench_linear_logprobs,
    bench_linear_ppo_loss,
    bench_linear_token_divergence,
    bench_logprobs,
    bench_masked_mean,
    bench_masked_whiten,
    bench_optimal_token_baseline,
    bench_orpo_loss,
    bench_ppo_loss,
    bench_simpo_loss,
    bench_token_divergence,
    lm_head,
    objectives,
    peers,
)
from rlhf_fast.ops.library import NAMESPACE, launch_within

CPU = torch.device("cpu")


def logprobs_case(shape, dtype: torch.dtype, entropy: bool, mode: str, provider: str):
    """A case of the logprobs suite: log-probs, with the entropy where `entropy`."""
    variant = "logp+entropy" if entropy else "logp"
    return bench_logprobs.SUITE.case(shape, mode, provider, dtype=dtype, variant=variant)


@pytest.mark.parametrize("mode", bench_logprobs.MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_liger_cross_entropy_adapter_passes_the_logprobs_gate(mode: str, dtype: torch.dtype):
    shape = (96, 1031)
    case = logprobs_case(shape, dtype, False, mode, "liger")
    inp = bench_logprobs.make_inputs(shape, dtype, CPU)
    before = inp.logits.clone()
    fn = bench_logprobs.SUITE.provider_fn(case, CPU)
    ok, errors = bench_logprobs._gate(case, inp, fn)
    assert ok, errors
    assert set(errors) == ({"logp"} if mode == "fwd" else {"logp", "grad"})
    timed, setup = bench_logprobs._timed(case, inp, fn)
    assert setup is not None  # liger writes into its input: a fresh copy per call
    timed(setup())
    assert torch.equal(inp.logits, before)


def test_liger_cross_entropy_has_no_entropy_row():
    row, outcome = bench_logprobs.SUITE.run_case(
        logprobs_case((8, 16), torch.float32, True, "fwd", "liger"),
        _Session(), benchmark=None,
    )
    assert outcome == "skip"
    assert row["status"] == "skipped: Liger-Kernel's cross entropy has no entropy output"


@pytest.mark.parametrize("mode", bench_linear_logprobs.MODES)
def test_liger_fused_linear_adapter_passes_the_linear_logprobs_gate(mode: str):
    shape = bench_linear_logprobs.QUICK_SHAPES[-1]
    case = bench_linear_logprobs.SUITE.case(shape, mode, "liger")
    assert bench_linear_logprobs.SUITE.unavailable(case, CPU) is None
    inp = bench_linear_logprobs.make_inputs(shape, CPU)
    fn = bench_linear_logprobs.SUITE.provider_fn(case, CPU)
    ok, errors = bench_linear_logprobs._gate(case, inp, fn)
    assert ok, errors
    if mode == "fwd+bwd":
        assert {"grad_hidden", "grad_weight"} <= set(errors)


@dataclasses.dataclass
class TrlPath:
    """Which of its code paths TRL takes on the CPU, and each time it chose its kernels."""

    kernel: bool
    picked: list[str]


@pytest.fixture(params=["fallback", "kernel"])
def trl_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> TrlPath:
    """TRL's PyTorch fallback (what the CPU rows run), or its Triton kernels (what CUDA
    runs) in the interpreter, its device checks made to accept the CPU."""
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    path = TrlPath(kernel=request.param == "kernel", picked=[])
    if path.kernel:
        monkeypatch.setattr(utils, "_supports_trl_loss_kernel",
                            lambda logits, *args, **kwargs: path.picked.append("logits") or True)
        monkeypatch.setattr(chunked_logprob, "_use_triton",
                            lambda device: path.picked.append("head") or True)
    return path


@pytest.mark.parametrize("mode", bench_logprobs.MODES)
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_trl_helpers_pass_the_logprobs_gate(trl_path: TrlPath, dtype: torch.dtype,
                                            entropy: bool, mode: str):
    shape = (96, 1031)
    case = logprobs_case(shape, dtype, entropy, mode, "trl")
    assert bench_logprobs.SUITE.unavailable(case, CPU) is None
    inp = bench_logprobs.make_inputs(shape, dtype, CPU)
    before = inp.logits.clone()
    fn = bench_logprobs.SUITE.provider_fn(case, CPU)
    ok, errors = bench_logprobs._gate(case, inp, fn)
    assert ok, errors
    expected = {"logp", "entropy"} if entropy else {"logp"}
    assert set(errors) == (expected if mode == "fwd" else expected | {"grad"})
    timed, setup = bench_logprobs._timed(case, inp, fn)
    out = timed(setup()) if setup is not None else timed()
    assert trl_path.picked == (["logits"] * 2 if trl_path.kernel else [])  # gate, timed call
    if mode == "fwd":  # TRL's kernel returns fp32, its fallback the logits' dtype
        dtypes = [torch.float32 if trl_path.kernel else dtype] * len(expected)
        assert [o.dtype for o in out] == dtypes
    assert torch.equal(inp.logits, before)


@pytest.mark.parametrize("mode", bench_linear_logprobs.MODES)
def test_trl_fused_head_passes_the_linear_logprobs_gate(trl_path: TrlPath, mode: str):
    shape = bench_linear_logprobs.QUICK_SHAPES[-1]
    case = bench_linear_logprobs.SUITE.case(shape, mode, "trl")
    assert bench_linear_logprobs.SUITE.unavailable(case, CPU) is None
    inp = bench_linear_logprobs.make_inputs(shape, CPU)
    fn = bench_linear_logprobs.SUITE.provider_fn(case, CPU)
    ok, errors = bench_linear_logprobs._gate(case, inp, fn)
    assert ok, errors
    assert set(errors) == ({"logp"} if mode == "fwd" else {"logp", "grad_hidden", "grad_weight"})
    calls = 1 if mode == "fwd" else 2  # forward, and backward
    assert trl_path.picked == (["head"] * calls if trl_path.kernel else [])


def test_the_gate_rejects_trl_at_another_temperature():
    """The suites run every provider at temperature 1; TRL's functions take the
    temperature and divide inside, so the same call at 2 must fail both gates."""
    from trl.trainer import utils

    shape = (96, 1031)
    inp = bench_logprobs.make_inputs(shape, torch.float32, CPU)

    def hot_logprobs(logits, labels, return_entropy):
        mask = labels != bench_logprobs.IGNORE_INDEX
        return utils.selective_log_softmax_and_entropy(logits, labels.clamp(min=0),
                                                       temperature=2.0, row_mask=mask)

    for mode in bench_logprobs.MODES:
        case = logprobs_case(shape, torch.float32, True, mode, "trl")
        ok, errors = bench_logprobs._gate(case, inp, hot_logprobs)
        assert not ok and errors["logp"] > 0.1, errors

    shape = bench_linear_logprobs.QUICK_SHAPES[-1]
    inp = bench_linear_logprobs.make_inputs(shape, CPU)

    def hot_head(hidden, weight, labels):
        mask = labels != lm_head.IGNORE_INDEX
        logp = utils._ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask],
                                                   2.0, 1024, None, 1.0, ("log_probs",))[0]
        return logp.new_zeros(labels.shape).masked_scatter(mask, logp)

    for mode in bench_linear_logprobs.MODES:
        case = bench_linear_logprobs.SUITE.case(shape, mode, "trl")
        ok, errors = bench_linear_logprobs._gate(case, inp, hot_head)
        assert not ok and errors["logp"] > 0.1, errors


class _NotInstalled(importlib.abc.MetaPathFinder):
    """Finds no module of `package`, raising what the import system raises then."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] == self.package:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


@pytest.fixture
def no_trl(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """TRL not installed: its modules unloaded (put back afterwards) and not found."""
    for name in [name for name in sys.modules if name.split(".")[0] == "trl"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled("trl"), *sys.meta_path])
    peers._import_attr.cache_clear()  # forget the imports cached with TRL present
    yield
    peers._import_attr.cache_clear()


@pytest.mark.usefixtures("no_trl")
def test_a_missing_trl_is_a_skipped_row_in_both_suites():
    cases = [
        logprobs_case((8, 16), torch.float32, True, "fwd+bwd", "trl"),
        bench_linear_logprobs.SUITE.case((8, 4, 16), "fwd+bwd", "trl"),
    ]
    for case in cases:
        row, outcome = case.suite.run_case(case, _Session(), benchmark=None)
        assert outcome == "skip"
        assert row["status"] == "skipped: trl not installed"
        assert row["provider"] == "trl" and row["median_ms"] is None


def test_a_peer_missing_a_dependency_says_which(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch):
    """TRL carried to a GPU without one of its dependencies is not "not installed"."""
    (tmp_path / "peer_without_its_dependency.py").write_text("import no_such_dependency_x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert peers.peer_entry("trl", "peer_without_its_dependency", "f", CPU) == (
        None, "peer_without_its_dependency failed to import: ModuleNotFoundError: "
              "No module named 'no_such_dependency_x'")


@pytest.mark.parametrize("mode", bench_grpo.MODES)
@pytest.mark.parametrize("provider", ["rlhf_fast", "rlhf_fast-inplace", "liger", "eager"])
def test_grpo_providers_pass_the_gate_and_leave_the_logits_alone(provider: str, mode: str):
    shape = bench_grpo.QUICK_SHAPES[0]  # (the kernels at every size: tests/test_logprobs.py)
    case = bench_grpo.SUITE.case(shape, mode, provider)
    inp = bench_grpo.make_inputs(shape, CPU)
    assert 0 < int(inp.mask.sum()) < inp.mask.numel()  # padding present
    before = inp.logits.clone()
    fn = bench_grpo.SUITE.provider_fn(case, CPU)
    ok, errors = bench_grpo._gate(case, inp, fn)
    assert ok, errors
    assert set(errors) == ({"loss"} if mode == "fwd" else {"loss", "grad"})
    timed, setup = bench_grpo.SUITE.timed(case, inp, fn)
    out = timed(setup()) if setup is not None else timed()
    if mode == "fwd":
        assert out.shape == ()
    else:
        assert out[0].shape == bench_grpo.logits_shape(case.shape)
    assert torch.equal(inp.logits, before)


@pytest.mark.parametrize("bug", ["symmetric clip", "padding in the mean"])
def test_grpo_gate_rejects_a_wrong_provider(bug: str):
    """The gate can fail: the eager loss without clip-higher, or averaging over the
    padding too, is reported wrong in both modes."""
    shape = bench_grpo.QUICK_SHAPES[-1]
    inp = bench_grpo.make_inputs(shape, CPU)
    high = objectives.CLIP_LOW if bug == "symmetric clip" else objectives.CLIP_HIGH

    def buggy(logits, ids, mask, old_logp, ref_logp, advantages):
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids.unsqueeze(-1))[..., 0]
        ratio = torch.exp(logp - old_logp)
        adv = advantages.unsqueeze(1)
        clipped = torch.clamp(ratio, 1 - objectives.CLIP_LOW, 1 + high)
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        per_token = -torch.min(ratio * adv, clipped * adv) + objectives.GRPO_BETA * kl
        if bug == "padding in the mean":
            return per_token.mean()
        return (per_token * mask).sum() / mask.sum()

    for mode in bench_grpo.MODES:
        ok, errors = bench_grpo._gate(bench_grpo.SUITE.case(shape, mode, "eager"), inp, buggy)
        assert not ok, errors


def test_grpo_inputs_clip_at_both_bounds_but_never_sit_on_one():
    inp = bench_grpo.make_inputs(bench_grpo.QUICK_SHAPES[-1], CPU)
    log_ratio = inp.logp64 - inp.old_logp.double()
    ratio = log_ratio.exp()
    assert (ratio < 1 - objectives.CLIP_LOW).float().mean() > 0.05
    assert (ratio > 1 + objectives.CLIP_HIGH).float().mean() > 0.05
    for edge in (math.log(1 - objectives.CLIP_LOW), math.log(1 + objectives.CLIP_HIGH)):
        assert (log_ratio - edge).abs().min() >= objectives.CLIP_EDGE_MARGIN - 1e-6
    assert (inp.advantages > 0).any() and (inp.advantages < 0).any()


@pytest.mark.parametrize("mode", bench_linear_ppo_loss.MODES)
@pytest.mark.parametrize("provider", ["rlhf_fast", "liger", "eager"])
@pytest.mark.parametrize("suite", [bench_linear_ppo_loss, bench_linear_dpo_loss],
                         ids=["linear_ppo_loss", "linear_dpo_loss"])
def test_hidden_state_loss_providers_pass_the_gate(suite, provider: str, mode: str):
    """rlhf_fast.linear_ppo_loss / linear_dpo_loss, Liger-Kernel's chunked fused linear
    GRPO / DPO losses (pure PyTorch: no interpreter needed; its DPO runs the reference
    model inside) and eager on materialised logits, against float64."""
    shape = suite.QUICK_SHAPES[-1]
    case = suite.SUITE.case(shape, mode, provider)
    assert suite.SUITE.unavailable(case, CPU) is None
    inp = suite.make_inputs(shape, CPU)
    fn = suite.SUITE.provider_fn(case, CPU)
    ok, errors = lm_head.gate_loss_from_hidden(case, inp, fn)
    assert ok, errors
    assert set(errors) == (
        {"loss"} if mode == "fwd" else {"loss", "grad_hidden", "grad_weight"}
    )


def test_linear_ppo_loss_gate_rejects_a_loss_averaged_over_the_padding():
    shape = bench_linear_ppo_loss.QUICK_SHAPES[-1]
    inp = bench_linear_ppo_loss.make_inputs(shape, CPU)

    def padded_mean(hidden, weight, ids, mask, old_logp, ref_logp, advantages):
        logp = objectives.eager_token_logps(hidden @ weight.T, ids)
        everything = torch.ones_like(mask)
        return objectives.eager_grpo_objective(logp, everything, old_logp, ref_logp, advantages)

    for mode in bench_linear_ppo_loss.MODES:
        case = bench_linear_ppo_loss.SUITE.case(shape, mode, "eager")
        ok, errors = lm_head.gate_loss_from_hidden(case, inp, padded_mean)
        assert not ok, errors


def test_linear_dpo_loss_gate_rejects_liger_misconfigured_to_average_log_probs():
    """The gate catches a peer set up for another objective: Liger's DPO loss with
    length-averaged sequence log-probs (its ``average_log_prob=True``) is not sigmoid DPO
    on summed log-probs."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    shape = bench_linear_dpo_loss.QUICK_SHAPES[-1]
    inp = bench_linear_dpo_loss.make_inputs(shape, CPU)
    loss_fn = LigerFusedLinearDPOLoss(beta=bench_linear_dpo_loss.BETA, compiled=False,
                                      average_log_prob=True)

    def averaged(hidden, weight, labels, ref_hidden, ref_weight):
        return loss_fn(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)[0]

    for mode in bench_linear_dpo_loss.MODES:
        case = bench_linear_dpo_loss.SUITE.case(shape, mode, "liger")
        ok, errors = lm_head.gate_loss_from_hidden(case, inp, averaged)
        assert not ok, errors


def test_peer_entry_says_why_a_peer_cannot_run(monkeypatch: pytest.MonkeyPatch):
    entry, reason = peers.peer_entry("liger", "liger_kernel.transformers",
                                     "LigerCrossEntropyLoss", CPU)
    assert entry is not None and reason is None  # interpreter on: CI can gate it
    monkeypatch.delenv("TRITON_INTERPRET")
    assert peers.peer_entry(
        "liger", "liger_kernel.transformers", "LigerCrossEntropyLoss", CPU
    ) == (None, "liger_kernel runs on CUDA (or TRITON_INTERPRET=1) only")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert peers.peer_entry("cce", "no_such_module_cce", "linear_cross_entropy", CPU) == (
        None, "no_such_module_cce not installed")
    assert peers.peer_entry("cce", "cut_cross_entropy", "linear_cross_entropy", CPU)[1] in (
        "cut_cross_entropy runs on CUDA only", "cut_cross_entropy not installed")
    monkeypatch.delenv("TRITON_INTERPRET")  # TRL picks torch ops off CUDA: no interpreter
    entry, reason = peers.peer_entry("trl", "trl.trainer.utils", "selective_log_softmax", CPU)
    assert entry is not None and reason is None


class _Session:
    """The bench_session fields a skipped case reads."""

    device = CPU
    copy_bandwidth = None


def forward_gate(suite, shape, fn):
    """A forward-only suite's gate on its inputs at `shape`, for the provider `fn`."""
    case = suite.SUITE.case(shape, "fwd", "rlhf_fast")
    return suite.SUITE.gate(case, suite.SUITE.make_inputs(case, CPU), fn)


@pytest.mark.parametrize("provider", bench_gae.PROVIDERS)
def test_gae_providers_pass_the_gate(provider: str, monkeypatch: pytest.MonkeyPatch):
    """Every GAE provider, the compiled ones run eagerly (compiling is the GPU's cost,
    the function compiled is what must be right)."""
    monkeypatch.setattr(peers, "compiled", lambda fn, variant="": fn)
    ok, errors = forward_gate(bench_gae, (6, 40), bench_gae.PROVIDERS[provider])
    assert ok, errors
    assert max(errors.values()) < 1e-6


def test_gae_gate_rejects_a_loop_without_the_mask():
    def unmasked(rewards, values, mask):
        return bench_gae.loop_gae(rewards, values, torch.ones_like(mask))

    ok, _ = forward_gate(bench_gae, (6, 40), unmasked)
    assert not ok


@pytest.mark.parametrize("suite, provider", [
    (suite, provider)
    for suite in (bench_masked_whiten, bench_group_advantages, bench_optimal_token_baseline)
    for provider in suite.PROVIDERS
], ids=lambda value: getattr(value, "OP", value))
def test_whiten_and_group_providers_pass_the_gate(
    suite, provider: str, monkeypatch: pytest.MonkeyPatch
):
    """masked_whiten's, group_advantages' and optimal_token_baseline's providers,
    compiled ones run eagerly."""
    monkeypatch.setattr(peers, "compiled", lambda fn, variant="": fn)
    shape = {bench_masked_whiten: (6, 40), bench_group_advantages: (48,),
             bench_optimal_token_baseline: (16, 40)}[suite]
    ok, errors = forward_gate(suite, shape, suite.PROVIDERS[provider])
    assert ok, errors
    assert max(errors.values()) < 1e-6


def test_optimal_token_baseline_gate_rejects_an_unweighted_baseline():
    def group_mean_baseline(rewards, mask, old_logp, log_sum_p2):  # W_t = 2 t: no variance
        return bench_optimal_token_baseline.eager_optimal_token_baseline(
            rewards, mask, torch.full_like(old_logp, -math.inf), torch.zeros_like(log_sum_p2))

    ok, errors = forward_gate(bench_optimal_token_baseline, (16, 40), group_mean_baseline)
    assert not ok, errors


@pytest.mark.parametrize("suite, provider", [
    (suite, provider) for suite in (bench_masked_mean, bench_masked_whiten)
    for provider in suite.PROVIDERS
], ids=lambda value: getattr(value, "OP", value))
def test_masked_mean_and_whiten_gradients_pass_the_gate(
    suite, provider: str, monkeypatch: pytest.MonkeyPatch
):
    """fwd+bwd (the headline run's mode, which gates the backward kernels on a GPU):
    outputs and the gradient w.r.t. the values, compiled providers run eagerly."""
    monkeypatch.setattr(peers, "compiled", lambda fn, variant="": fn)
    case = suite.SUITE.case((6, 40), "fwd+bwd", provider)
    ok, errors = suite.SUITE.gate(case, suite.SUITE.make_inputs(case, CPU),
                                  suite.SUITE.provider_fn(case, CPU))
    assert ok, errors
    assert "grad_values" in errors and max(errors.values()) < 1e-6, errors


def test_masked_mean_gate_rejects_a_gradient_through_the_mean_of_every_entry():
    def detached_mean(x, mask):  # the right means, the gradient of x.mean(-1)
        means = bench_masked_mean.eager_masked_mean(x.detach(), mask)
        return means + x.mean(-1) - x.mean(-1).detach()

    case = bench_masked_mean.SUITE.case((6, 40), "fwd+bwd", "rlhf_fast")
    ok, errors = bench_masked_mean.SUITE.gate(
        case, bench_masked_mean.SUITE.make_inputs(case, CPU), detached_mean)
    assert not ok and errors["mean"] < 1e-6, errors


@pytest.mark.parametrize("provider", ["rlhf_fast", "eager"])
def test_ppo_loss_gspo_variant_passes_the_gate(provider: str):
    """The headline run's gspo + rollout correction variant (the sequence pass and the
    IS-weighted policy term), loss and the three gradients."""
    case = bench_ppo_loss.SUITE.case((4, 24), "fwd+bwd", provider,
                                     variant=bench_ppo_loss.GSPO)
    inputs = bench_ppo_loss.make_inputs(case.shape, CPU)
    ok, errors = bench_ppo_loss.SUITE.gate(case, inputs, bench_ppo_loss.PROVIDERS[provider])
    assert ok and max(errors.values()) < 1e-6, errors


def test_masked_whiten_gate_rejects_a_biased_whiten():
    def biased(x, mask):  # variance over n, not n - 1
        mean = bench_masked_whiten.masked_mean(x, mask)
        var = bench_masked_whiten.masked_mean((x - mean) ** 2, mask)
        return (x - mean) * torch.rsqrt(var + bench_masked_whiten.WHITEN_EPS) * mask

    ok, errors = forward_gate(bench_masked_whiten, (6, 40), biased)
    assert not ok, errors


def divergence_case(shape, mode: str, provider: str, variant: str,
                    dtype: torch.dtype = torch.bfloat16):
    """A case of the token_divergence suite (`variant`: the divergence)."""
    return bench_token_divergence.SUITE.case(shape, mode, provider, dtype=dtype, variant=variant)


@pytest.mark.parametrize("mode", bench_token_divergence.MODES)
@pytest.mark.parametrize("variant", bench_token_divergence.VARIANTS)
def test_liger_jsd_adapter_passes_the_token_divergence_gate(
    variant: str, mode: str, monkeypatch: pytest.MonkeyPatch
):
    """LigerJSD (reduced: sum / counted rows) against the float64 reference's same
    reduction, taken 10 rows at a time as at the GPU shapes, and its gradient; at beta 0
    and 1 its kernel's KL branches."""
    shape = (96, 1031)
    monkeypatch.setattr(bench_token_divergence.gates, "REF_CHUNK_ELEMENTS", 10 * shape[1])
    case = divergence_case(shape, mode, "liger", variant)
    assert bench_token_divergence.SUITE.unavailable(case, CPU) is None
    inp = bench_token_divergence.make_inputs(shape, case.dtype, CPU)
    before = (inp.student.clone(), inp.teacher.clone())
    fn = bench_token_divergence.SUITE.provider_fn(case, CPU)
    ok, errors = bench_token_divergence._gate(case, inp, fn)
    assert ok, errors
    assert set(errors) == ({"loss"} if mode == "fwd" else {"loss", "grad"})
    timed, setup = bench_token_divergence._timed(case, inp, fn)
    assert setup is None or mode == "bwd"  # it writes into a copy of its own input only
    out = timed(setup()) if setup is not None else timed()
    if mode == "fwd":
        assert out.shape == ()
    assert torch.equal(inp.student, before[0]) and torch.equal(inp.teacher, before[1])


@pytest.mark.parametrize("variant", bench_token_divergence.VARIANTS)
@pytest.mark.parametrize("provider, mode", [
    ("rlhf_fast", "fwd"), ("rlhf_fast", "fwd+bwd"), ("rlhf_fast-inplace", "bwd"),
    ("eager", "fwd"), ("eager", "fwd+bwd"), ("compile", "bwd"),
])
def test_token_divergence_providers_pass_the_gate_and_leave_the_inputs_alone(
    provider: str, mode: str, variant: str, monkeypatch: pytest.MonkeyPatch
):
    """Ours (through the interpreter, at a few rows) and eager / compile (run eagerly),
    per token and gradient; eager past GATE_ALL_ROWS rows, so on the gate's row subset."""
    monkeypatch.setattr(peers, "compiled", lambda fn, variant="": fn)
    ours = provider.startswith("rlhf_fast")
    shape = (16, 333) if ours else (300, 257)
    case = divergence_case(shape, mode, provider, variant, torch.float32 if ours else
                           torch.bfloat16)
    inp = bench_token_divergence.make_inputs(shape, case.dtype, CPU)
    before = inp.student.clone()
    fn = bench_token_divergence.SUITE.provider_fn(case, CPU)
    ok, errors = bench_token_divergence._gate(case, inp, fn)
    assert ok, errors
    assert set(errors) == ({"divergence"} if mode == "fwd" else {"divergence", "grad"})
    timed, setup = bench_token_divergence._timed(case, inp, fn)
    assert (setup is not None) == (mode == "bwd" or provider == "rlhf_fast-inplace")
    out = timed(setup()) if setup is not None else timed()
    assert (out.shape if mode == "fwd" else out[0].shape) == (shape if mode != "fwd" else
                                                              shape[:1])
    assert torch.equal(inp.student, before)


@pytest.mark.parametrize("variant", bench_token_divergence.VARIANTS)
def test_eager_divergence_is_trls_generalized_jsd_per_token(variant: str):
    """The eager provider is TRL's GKD loss per token: `generalized_jsd_loss` with
    reduction "none" keeps the counted rows' terms, whose vocabulary sums it must give
    (on fp32 logits, where its log_softmax in the logits' dtype is the eager's fp32)."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    inp = bench_token_divergence.make_inputs((40, 301), torch.float32, CPU)
    counted = inp.labels != bench_token_divergence.IGNORE_INDEX
    theirs = gkd.GKDTrainer.generalized_jsd_loss(
        inp.student, inp.teacher, inp.labels, beta=bench_token_divergence.PEER_BETA[variant],
        reduction="none").sum(-1)
    ours = bench_token_divergence.eager_divergence(inp.student, inp.teacher, inp.labels, variant)
    torch.testing.assert_close(ours[counted], theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[~counted], torch.zeros(int((~counted).sum())))


@pytest.mark.parametrize("bug", ["ignored rows counted", "student and teacher swapped"])
def test_token_divergence_gate_rejects_a_wrong_provider(bug: str):
    """The gate can fail: eager with the ignored rows counted (jsd), or with the student
    and teacher swapped (the forward KL computing the reverse one), in every mode."""
    shape = (64, 257)
    inp = bench_token_divergence.make_inputs(shape, torch.float32, CPU)

    def buggy(student, teacher, labels, divergence):
        if bug == "ignored rows counted":
            everything = torch.zeros_like(labels)
            return bench_token_divergence.eager_divergence(student, teacher, everything,
                                                           divergence)
        return bench_token_divergence.eager_divergence(teacher, student, labels, divergence)

    variant = "jsd" if bug == "ignored rows counted" else "forward_kl"
    for mode in bench_token_divergence.MODES:
        case = divergence_case(shape, mode, "eager", variant, torch.float32)
        ok, errors = bench_token_divergence._gate(case, inp, buggy)
        assert not ok and errors["divergence"] > 0.01, errors


def test_token_divergence_gate_rejects_liger_at_the_other_end_of_beta():
    """Liger's beta convention is checked, not assumed: its KL at beta 1 (the reverse
    KL) is not the forward KL."""
    from liger_kernel.transformers import LigerJSD

    shape = (64, 257)
    inp = bench_token_divergence.make_inputs(shape, torch.float32, CPU)
    loss_fn = LigerJSD(beta=1.0, ignore_index=bench_token_divergence.IGNORE_INDEX)

    def reverse(student, teacher, labels, divergence):
        return loss_fn(student.float().log_softmax(-1), teacher.float().log_softmax(-1), labels)

    for mode in bench_token_divergence.MODES:
        case = divergence_case(shape, mode, "liger", "forward_kl", torch.float32)
        ok, errors = bench_token_divergence._gate(case, inp, reverse)
        assert not ok and errors["loss"] > 0.01, errors


@pytest.fixture
def no_liger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Liger-Kernel not installed: its modules unloaded (put back afterwards) and not found."""
    for name in [name for name in sys.modules if name.split(".")[0] == "liger_kernel"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled("liger_kernel"), *sys.meta_path])
    peers._import_attr.cache_clear()  # forget the imports cached with Liger present
    yield
    peers._import_attr.cache_clear()


@pytest.mark.usefixtures("no_liger")
def test_a_missing_liger_is_a_skipped_token_divergence_row():
    case = divergence_case((8, 16), "fwd+bwd", "liger", "jsd", torch.float32)
    row, outcome = bench_token_divergence.SUITE.run_case(case, _Session(), benchmark=None)
    assert outcome == "skip"
    assert row["status"] == "skipped: liger_kernel not installed"
    assert row["provider"] == "liger" and row["median_ms"] is None
    assert row["variant"] == "jsd"


# --------------------------------------------------------------------------- peers' plumbing


def test_compiled_is_built_once_per_function_and_variant(monkeypatch: pytest.MonkeyPatch):
    """A suite may ask for its compiled eager code in every timed call: the second ask
    must get the first one's, not a new code copy for Dynamo to compile again."""
    built = []
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kwargs: built.append(fn.__code__.co_name) or fn)
    peers.compiled.cache_clear()

    def eager(x):
        return x

    try:
        assert peers.compiled(eager, "jsd") is peers.compiled(eager, "jsd")
        peers.compiled(eager, "forward_kl")
        peers.compiled(eager)
        peers.compiled(eager)
        assert built == ["eager__jsd", "eager__forward_kl", "eager"]
    finally:
        peers.compiled.cache_clear()


def test_first_output_keeps_no_loss_alive():
    """A peer's loss (and the graph behind it) is freed once the caller drops it."""
    import gc
    import weakref

    loss = torch.ones((), requires_grad=True) * 2
    alive = weakref.ref(loss)
    assert peers.first_output((loss, torch.zeros(3))) is loss
    assert peers.first_output(loss) is loss
    del loss
    gc.collect()
    assert alive() is None


class _GemmFlops:
    """FLOPs of the matrix products run inside the block (a torch dispatch mode)."""

    NAMES = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "matmul"}

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == NAMESPACE:  # the GEMMs inside an rlhf_fast op
                    return launch_within(self, func, args, kwargs or {})
                name = func.overloadpacket.__name__
                if name in counter.NAMES:
                    a, b = args[1:3] if name.startswith(("addmm", "baddbmm")) else args[:2]
                    counter.flops += 2 * a.numel() * b.shape[-1]
                return func(*args, **(kwargs or {}))

        self.flops = 0
        self.mode = Mode()


@pytest.mark.parametrize("mode", lm_head.MODES)
@pytest.mark.parametrize("suite, provider, variant", [
    (bench_simpo_loss, "liger", ""), (bench_kto_loss, "liger", ""),
    (bench_kto_loss, "rlhf_fast", ""), (bench_linear_dpo_loss, "liger", ""),
    (bench_linear_ppo_loss, "liger", ""),
    (bench_linear_token_divergence, "liger", "jsd"),
    (bench_linear_token_divergence, "rlhf_fast", "jsd"),
], ids=lambda value: getattr(value, "OP", value))
def test_gemm_counts_are_the_gemms_the_providers_run(suite, provider: str, variant: str,
                                                     mode: str):
    """The roofline columns' ``gemms`` of a provider is what one timed call multiplies:
    the FLOPs of its matrix products, counted as it runs (Liger's chunked losses: with
    nothing requiring grad, the forward alone in the installed release)."""
    shape = suite.QUICK_SHAPES[0]
    case = suite.SUITE.case(shape, mode, provider, variant=variant)
    inp = suite.SUITE.make_inputs(case, CPU)
    fn = suite.SUITE.provider_fn(case, CPU)
    timed, setup = suite.SUITE.timed(case, inp, fn)
    assert setup is None
    timed()  # first calls: one-time probes (e.g. of an fp32-output GEMM) not counted
    counter = _GemmFlops()
    with counter.mode:
        timed()
    columns = suite.SUITE.columns(case, inp, {"median_ms": 1.0}, 1e12)
    assert counter.flops == columns["flops"], (counter.flops / columns["flops"],
                                               columns["gemms"])


# --------------------------------------------------------------------------- distillation
# from hidden states


def linear_divergence_case(shape, mode: str, provider: str, variant: str):
    """A case of the linear_token_divergence suite (`variant`: the divergence)."""
    return bench_linear_token_divergence.SUITE.case(shape, mode, provider, variant=variant)


@pytest.mark.parametrize("variant", bench_linear_token_divergence.VARIANTS)
def test_liger_fused_linear_jsd_adapter_passes_the_gate(variant: str):
    """LigerFusedLinearJSD (reduced: sum / counted rows; its KLs at jsd_beta 0 and 1)
    against the float64 reference's same reduction and its gradients, at the small size
    (4 token chunks of Liger's); jsd also at the size where the gate's row and vocab
    subsets apply (40 chunks: d weight accumulated in bf16 over them)."""
    suite = bench_linear_token_divergence
    small, large = suite.QUICK_SHAPES[0], suite.QUICK_SHAPES[-1]
    sizes = [(small, "fwd"), (small, "fwd+bwd")] + [(large, "fwd+bwd")] * (variant == "jsd")
    for shape, mode in sizes:
        case = linear_divergence_case(shape, mode, "liger", variant)
        assert suite.SUITE.unavailable(case, CPU) is None
        inp = suite.make_inputs(shape, CPU)
        fn = suite.SUITE.provider_fn(case, CPU)
        ok, errors = suite._gate(case, inp, fn)
        assert ok, (mode, errors)
        assert set(errors) == ({"loss"} if mode == "fwd" else
                               {"loss", "grad_hidden", "grad_weight"})


@pytest.mark.parametrize("variant", bench_linear_token_divergence.VARIANTS)
@pytest.mark.parametrize("provider, mode", [
    ("rlhf_fast", "fwd+bwd"), ("eager", "fwd+bwd"), ("compile", "fwd"),
])
def test_linear_token_divergence_providers_pass_the_gate(
    provider: str, mode: str, variant: str, monkeypatch: pytest.MonkeyPatch
):
    """Ours (through the interpreter, at the small size) and eager / compile (run
    eagerly, at the size with the gate's subsets), per token and gradient."""
    monkeypatch.setattr(peers, "compiled", lambda fn, variant="": fn)
    suite = bench_linear_token_divergence
    shape = suite.QUICK_SHAPES[0 if provider == "rlhf_fast" else -1]
    case = linear_divergence_case(shape, mode, provider, variant)
    inp = suite.make_inputs(shape, CPU)
    fn = suite.SUITE.provider_fn(case, CPU)
    ok, errors = suite._gate(case, inp, fn)
    assert ok, errors
    assert set(errors) == ({"divergence"} if mode == "fwd" else
                           {"divergence", "grad_hidden", "grad_weight"})


def test_linear_token_divergence_gate_rejects_a_wrong_provider():
    """The gate can fail: the models swapped (the forward KL computing the reverse one),
    and Liger's JSD at the other end of beta (its reverse KL for the forward one)."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    suite = bench_linear_token_divergence
    shape = suite.QUICK_SHAPES[0]
    inp = suite.make_inputs(shape, CPU)

    def swapped(hidden, weight, teacher_hidden, teacher_weight, labels, divergence):
        student, teacher = hidden @ weight.T, teacher_hidden @ teacher_weight.T
        return objectives.eager_divergence(teacher, student, labels, divergence)

    reverse = LigerFusedLinearJSD(jsd_beta=1.0)
    for mode in suite.MODES:
        for provider, fn in (("eager", swapped), ("liger", lambda *args: reverse(*args[:5]))):
            case = linear_divergence_case(shape, mode, provider, "forward_kl")
            ok, errors = suite._gate(case, inp, fn)
            assert not ok and max(errors.values()) > 0.05, (provider, mode, errors)


# --------------------------------------------------------------------------- preference
# losses from hidden states

PREFERENCE_SUITES = [bench_simpo_loss, bench_cpo_loss, bench_orpo_loss, bench_kto_loss]


@pytest.mark.parametrize("mode", lm_head.MODES)
@pytest.mark.parametrize("provider", ["rlhf_fast", "liger", "eager"])
@pytest.mark.parametrize("suite", PREFERENCE_SUITES, ids=lambda suite: suite.OP)
def test_preference_loss_providers_pass_the_gate(suite, provider: str, mode: str):
    """The composition (through the interpreter, at the small size), Liger-Kernel's
    chunked SimPO / CPO / ORPO / KTO losses (pure PyTorch: no interpreter needed; KTO's
    runs the reference model inside) and eager on materialised logits, against
    float64."""
    shape = suite.QUICK_SHAPES[0 if provider == "rlhf_fast" else -1]
    case = suite.SUITE.case(shape, mode, provider)
    assert suite.SUITE.unavailable(case, CPU) is None
    inp = suite.make_inputs(shape, CPU)
    fn = suite.SUITE.provider_fn(case, CPU)
    ok, errors = lm_head.gate_loss_from_hidden(case, inp, fn)
    assert ok, errors
    assert set(errors) == (
        {"loss"} if mode == "fwd" else {"loss", "grad_hidden", "grad_weight"}
    )


def _gate_rejects(suite, fn, modes=lm_head.MODES) -> dict[str, dict[str, float]]:
    """The gate's errors of `fn` in each of `modes`, each of which it must fail."""
    shape = suite.QUICK_SHAPES[-1]
    inp = suite.make_inputs(shape, CPU)
    all_errors = {}
    for mode in modes:
        case = suite.SUITE.case(shape, mode, "liger")
        ok, all_errors[mode] = lm_head.gate_loss_from_hidden(case, inp, fn)
        assert not ok, (mode, all_errors[mode])
    return all_errors


def test_simpo_gate_rejects_liger_with_its_default_nll():
    """Liger's SimPO module adds alpha (1) times the chosen NLL by default
    (compute_nll_loss=True: CPO-SimPO); SimPO has no NLL, so the suite turns it off and
    the gate rejects the default."""
    from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss

    loss_fn = LigerFusedLinearSimPOLoss(compiled=False, **bench_simpo_loss.OPTIONS)
    assert loss_fn.compute_nll_loss
    errors = _gate_rejects(bench_simpo_loss, lambda hidden, weight, labels:
                           loss_fn(weight, hidden, labels)[0])
    assert errors["fwd"]["loss"] > 1  # the NLL (~10 nats here) against a loss of ~0.9


def test_orpo_gate_rejects_trls_nll_over_the_prompt_too():
    """TRL's ORPOTrainer takes the NLL over the whole chosen sequence, prompt included
    (Liger's nll_target does the same): not orpo_loss's NLL, over the answer tokens it
    is given, which is what the suite compares. The gradient tells them apart (the
    prompt's hidden states get one); the value barely does on these inputs, whose
    prompt and answer tokens are alike random (so only fwd+bwd is asserted)."""
    from liger_kernel.chunked_loss import LigerFusedLinearORPOLoss

    loss_fn = LigerFusedLinearORPOLoss(compiled=False, **bench_orpo_loss.OPTIONS)

    def prompt_too(hidden, weight, labels):
        answer = labels != lm_head.IGNORE_INDEX
        prompt = answer.cumsum(-1) == 0  # before the first answer token (padding after)
        nll_target = torch.where(prompt, torch.arange(labels.shape[1]) + 1, labels)
        return loss_fn(weight, hidden, labels, nll_target=nll_target)[0]

    errors = _gate_rejects(bench_orpo_loss, prompt_too, modes=("fwd+bwd",))
    assert errors["fwd+bwd"]["grad_hidden"] > 0.1


def test_kto_gate_rejects_per_token_mean_log_probs():
    """Liger's KTO sums each answer's log-probs by default (average_log_prob=False), as
    TRL's KTOTrainer does; per-token means are another loss, which the gate rejects."""
    import inspect

    from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

    assert inspect.signature(LigerFusedLinearKTOLoss).parameters[
        "average_log_prob"].default is False
    loss_fn = LigerFusedLinearKTOLoss(use_ref_model=True, average_log_prob=True,
                                      compiled=False, **bench_kto_loss.OPTIONS)

    def means(hidden, weight, labels, ref_hidden, ref_weight, desirable, kl):
        return loss_fn(hidden, weight, labels, preference_labels=desirable,
                       ref_input=ref_hidden, ref_weight=ref_weight, kl=kl)[0]

    errors = _gate_rejects(bench_kto_loss, means)
    assert errors["fwd"]["loss"] > 0.05 and errors["fwd+bwd"]["grad_hidden"] > 0.5


@pytest.mark.usefixtures("no_liger")
def test_a_missing_liger_is_a_skipped_row_in_the_suites_from_hidden_states():
    cases = [
        linear_divergence_case((8, 4, 16), "fwd+bwd", "liger", "jsd"),
        *(suite.SUITE.case((2, 4, 4, 16), "fwd", "liger") for suite in PREFERENCE_SUITES),
    ]
    for case in cases:
        row, outcome = case.suite.run_case(case, _Session(), benchmark=None)
        assert outcome == "skip"
        assert row["status"] == "skipped: liger_kernel not installed"
        assert row["provider"] == "liger" and row["median_ms"] is None
