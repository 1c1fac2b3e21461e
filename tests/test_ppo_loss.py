"""rlhf_fast.ppo_loss: the fused kernels (through the interpreter) against the reference."""

import itertools
import math

import pytest
import torch

import rlhf_fast
from helpers import rel_err
from rlhf_fast import reference
from rlhf_fast.types import AGG_MODES, KL_ESTIMATORS

DIFFERENTIABLE = ("logp", "entropy", "values")
# Coefficients exactly representable in fp32: the kernels take scalars as fp32, so the
# float64 comparisons below stay exact to rounding of the data, not of the settings.
FULL = dict(clip_eps=0.25, clip_eps_high=0.375, kl_coef=0.125, entropy_coef=0.0625,
            value_clip=0.25, vf_coef=0.5)


def random_batch(B=6, T=37, dtype=torch.float64, spread=0.4):
    """PPO inputs with varied masks: a full row, an empty row, one-token rows, left and
    right padding and holes; masked entries hold NaN so that any leak shows."""
    def noise():
        return torch.randn(B, T, dtype=torch.float64)

    logp = -noise().abs() - 0.5
    batch = dict(
        logp=logp, old_logp=logp + spread * noise(), advantages=2 * noise(),
        ref_logp=logp + spread * noise(), entropy=noise().abs() + 0.5,
        values=noise(), old_values=noise(), returns=noise(),
    )
    mask = torch.rand(B, T) < 0.7
    rows = [torch.ones(T, dtype=torch.bool), torch.zeros(T, dtype=torch.bool)]
    one = torch.zeros(T, dtype=torch.bool)
    one[T // 2] = True
    left = torch.arange(T) >= T // 3
    right = torch.arange(T) < T - 5
    rows += [one, left, right]
    for i, row in enumerate(rows[:B]):
        mask[i] = row
    batch = {k: v.masked_fill(~mask, float("nan")).to(dtype) for k, v in batch.items()}
    batch["mask"] = mask
    return batch


def run(fn, batch, grads=DIFFERENTIABLE, upstream=None, **options):
    """Call `fn` on leaves built from `batch`; backprop an upstream mix of the outputs.
    Returns (outputs, {name: grad})."""
    leaves = {k: v.clone().requires_grad_(k in grads) for k, v in batch.items() if k != "mask"}
    tensors = dict(leaves)
    out = fn(
        tensors.pop("logp"), tensors.pop("old_logp"), tensors.pop("advantages"),
        batch["mask"], **tensors, **options,
    )
    if upstream is None:
        upstream = torch.ones(5)
    total = sum(w * term for w, term in zip(upstream.tolist(), out[:5]))
    total.backward()
    return out, {k: leaves[k].grad for k in grads}


def compare(batch, options, tol, grads=DIFFERENTIABLE):
    # Positive weights in [0.5, 1.5): the terms sharing a gradient (loss and value_loss
    # into d values, say) never cancel, which would leave the comparison to rounding.
    upstream = 0.5 + torch.rand(5, dtype=torch.float64)
    out, g = run(rlhf_fast.ppo_loss, batch, grads, upstream, **options)
    ref_batch = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    ref, g_ref = run(reference.ppo_loss, ref_batch, grads, upstream, **options)
    for name, a, b in zip(ref._fields, out, ref):
        assert math.isfinite(a.item()), name
        assert abs(a.item() - b.item()) <= tol * max(1.0, abs(b.item())), (name, a, b)
    for name in grads:
        assert g[name].dtype == batch[name].dtype
        assert torch.isfinite(g[name]).all(), name
        assert rel_err(g[name], g_ref[name]) < tol, name


def without(batch, *keys):
    return {k: v for k, v in batch.items() if k not in keys}


# ----------------------------------------------------------------- hand-computed cases


def test_reference_hand_case_policy_clip_and_kl():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]], dtype=torch.float64)
    old = torch.tensor([[math.log(0.25), math.log(0.4)]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.4), math.log(0.1)]], dtype=torch.float64)
    mask = torch.tensor([[True, True]])
    # ratios 2.0 and 0.5; with eps 0.2: token 0 clipped to 1.2 -> pg = -1.2;
    # token 1: max(-(-2)*0.5, -(-2)*0.8) = 1.6, clipped.
    for est, kls in {
        "k1": [math.log(0.5 / 0.4), math.log(0.2 / 0.1)],
        "k2": [0.5 * math.log(0.5 / 0.4) ** 2, 0.5 * math.log(2.0) ** 2],
        "k3": [0.8 - math.log(0.8) - 1, 0.5 - math.log(0.5) - 1],
    }.items():
        out = reference.ppo_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1,
                                 kl_estimator=est)
        assert out.policy_loss.item() == pytest.approx((-1.2 + 1.6) / 2)
        assert out.kl.item() == pytest.approx(sum(kls) / 2)
        assert out.loss.item() == pytest.approx(0.2 + 0.1 * sum(kls) / 2)
        assert out.clipfrac.item() == 1.0
        assert out.ratio_mean.item() == pytest.approx(1.25)
        assert out.ratio_max.item() == pytest.approx(2.0)
        assert out.approx_kl.item() == pytest.approx(0.5 * math.log(2) ** 2)


def test_reference_kl_estimators_hand_case():
    """Values and d / d logp of every estimator, from Schulman's formulas (x = ref - logp)
    and verl's clamps, on log-ratios inside and beyond them."""
    xs = [-0.5, 3.0, -3.0, -29.0]  # k3 = e^x - x - 1: 0.107, 16.1 (> 10), 2.05, 28 (x < -20)
    logp = torch.full((4,), -1.0, dtype=torch.float64, requires_grad=True)
    ref = logp.detach() + torch.tensor(xs, dtype=torch.float64)
    k3 = [math.exp(x) - x - 1 for x in xs]
    d_k3 = [1 - math.exp(x) for x in xs]
    lv = [math.exp(max(x, -20)) - max(x, -20) - 1 for x in xs]
    expected = {
        "k1": ([-x for x in xs], [1.0] * 4),
        "k2": ([x * x / 2 for x in xs], [-x for x in xs]),
        "k3": (k3, d_k3),
        "abs": ([abs(x) for x in xs], [-math.copysign(1, x) for x in xs]),
        "low_var_kl": ([min(v, 10) for v in lv], [d_k3[0], 0.0, d_k3[2], 0.0]),
    }
    for name, (values, _) in list(expected.items()):
        if name != "k2":  # straight through: the value, and k2's gradient logp - ref
            expected[name + "+"] = (values, [-x for x in xs])
    assert set(expected) == set(KL_ESTIMATORS)
    for name, (values, grads) in expected.items():
        kl = reference.kl_penalty(logp, ref, name)
        (grad,) = torch.autograd.grad(kl.sum(), logp)
        assert kl.tolist() == pytest.approx(values, rel=1e-12), name
        assert grad.tolist() == pytest.approx(grads, rel=1e-12), name


def verl_kl_penalty(logp, ref_logp, name):
    """verl's kl_penalty (verl/trainer/ppo/core_algos.py), rewritten from its code: its
    "k3" is clamped, as low_var_kl."""
    if name.endswith("+"):
        k2 = 0.5 * (logp - ref_logp).square()
        return k2 - k2.detach() + verl_kl_penalty(logp, ref_logp, name[:-1]).detach()
    if name == "k1":
        return logp - ref_logp
    if name == "abs":
        return (logp - ref_logp).abs()
    if name == "k2":
        return 0.5 * (logp - ref_logp).square()
    kl = torch.clamp(ref_logp - logp, min=-20, max=20)
    return torch.clamp(kl.exp() - kl - 1, min=-10, max=10)


def test_reference_kl_agrees_with_verl_but_for_an_unclamped_k3():
    logp = (-torch.rand(500, dtype=torch.float64) * 5).requires_grad_()
    ref = logp.detach() + torch.linspace(-30, 30, 500, dtype=torch.float64)
    for name in KL_ESTIMATORS:
        ours, theirs = reference.kl_penalty(logp, ref, name), verl_kl_penalty(logp, ref, name)
        (g_ours,) = torch.autograd.grad(ours.sum(), logp)
        (g_theirs,) = torch.autograd.grad(theirs.sum(), logp)
        if name in ("k3", "k3+"):  # Schulman's k3, as TRL's: verl clamps it at 10
            big = ours > 10
            assert big.any() and (~big).any()
            assert (theirs[big] == 10).all() and torch.equal(ours[~big], theirs[~big])
            assert torch.equal(g_ours[~big], g_theirs[~big]), name
            continue
        assert torch.equal(ours, theirs), name
        assert torch.equal(g_ours, g_theirs), name


@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_kl_estimators_match_reference(kl_estimator):
    """Log-ratios from -35.5 to 35.5 along every row: low_var_kl's clamps hold on some
    tokens of the full row and not on others."""
    batch = random_batch()
    offsets = torch.linspace(-35.5, 35.5, batch["logp"].shape[1], dtype=torch.float64)
    batch["ref_logp"] = batch["logp"] + offsets
    compare(batch, dict(FULL, kl_estimator=kl_estimator), tol=1e-10)


def test_reference_hand_case_dual_clip_and_value_loss():
    logp = torch.tensor([[math.log(4.0)]], dtype=torch.float64)
    old = torch.zeros(1, 1, dtype=torch.float64)
    adv = torch.tensor([[-1.0]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    # ratio 4: pg = max(4, 1.2) = 4, dual clip 3 bounds it at 3
    out = reference.ppo_loss(logp, old, adv, mask, dual_clip=3.0)
    assert out.policy_loss.item() == pytest.approx(3.0)
    v, old_v, ret = (torch.tensor([[x]], dtype=torch.float64) for x in (1.0, 0.0, 0.5))
    # unclipped (1 - 0.5)^2 = 0.25; clipped v = 0.2 -> (0.2 - 0.5)^2 = 0.09; max 0.25 / 2
    out = reference.ppo_loss(logp, old, adv, mask, values=v, old_values=old_v, returns=ret)
    assert out.value_loss.item() == pytest.approx(0.125)
    assert out.value_clipfrac.item() == 0.0
    ret = torch.tensor([[2.0]], dtype=torch.float64)  # now the clipped error is larger
    out = reference.ppo_loss(logp, old, adv, mask, values=v, old_values=old_v, returns=ret)
    assert out.value_loss.item() == pytest.approx(0.5 * 1.8**2)
    assert out.value_clipfrac.item() == 1.0


def test_reference_hand_case_aggregation_modes():
    # token losses: row 0 = [1, 3] (both valid), row 1 = [5, x] (one valid), row 2 empty
    adv = torch.tensor([[-1.0, -3.0], [-5.0, 7.0], [2.0, 2.0]], dtype=torch.float64)
    logp = torch.zeros(3, 2, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    expected = {
        "token-mean": (1 + 3 + 5) / 3,
        "seq-mean-token-mean": (2 + 5) / 2,
        "seq-mean-token-sum": (4 + 5) / 2,
        "seq-mean-token-sum-norm": 9 / (3 * 4),
        "token-sum": 9,
    }
    for agg, value in expected.items():
        out = reference.ppo_loss(logp, logp, adv, mask, agg=agg, max_len=4)
        assert out.policy_loss.item() == pytest.approx(value), agg
    # global counts: 12 tokens, 5 sequences, 4 ranks (every term times 4)
    expected = {
        "token-mean": 9 / 12 * 4,
        "seq-mean-token-mean": (2 + 5) / 5 * 4,
        "seq-mean-token-sum": 9 / 5 * 4,
        "seq-mean-token-sum-norm": 9 / (5 * 4) * 4,
        "token-sum": 9 * 4,
    }
    for agg, value in expected.items():
        out = reference.ppo_loss(logp, logp, adv, mask, agg=agg, max_len=4,
                                 batch_num_tokens=12, global_batch_size=5, dp_size=4)
        assert out.policy_loss.item() == pytest.approx(value), agg


# ----------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dual_clip", [None, 2.5])
def test_matches_reference_all_options(agg, kl_estimator, dual_clip):
    batch = random_batch()
    options = dict(FULL, agg=agg, kl_estimator=kl_estimator, dual_clip=dual_clip)
    compare(batch, options, tol=1e-10)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_global_counts_match_reference(agg):
    options = dict(FULL, agg=agg, batch_num_tokens=97, global_batch_size=11, dp_size=3)
    compare(random_batch(), options, tol=1e-10)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_global_counts_make_the_loss_independent_of_the_split(agg):
    """Two ranks, each with half the rows, the global counts and dp_size=2: the mean of
    their losses is the whole batch's loss, and their gradients its gradient."""
    batch = random_batch()
    mask = batch["mask"]
    rows = mask.shape[0] if agg == "seq-mean-token-sum-norm" else int(mask.any(-1).sum())
    counts = dict(batch_num_tokens=int(mask.sum()), global_batch_size=rows)
    whole, whole_grads = run(rlhf_fast.ppo_loss, batch, **FULL, agg=agg)
    halves = [{k: v[part] for k, v in batch.items()} for part in (slice(0, 3), slice(3, None))]
    outs = [run(rlhf_fast.ppo_loss, half, **FULL, agg=agg, dp_size=2, **counts)
            for half in halves]
    for i in range(5):  # loss and its four terms
        mean = (outs[0][0][i] + outs[1][0][i]) / 2
        assert mean.item() == pytest.approx(whole[i].item(), rel=1e-12, abs=1e-14)
    for name in DIFFERENTIABLE:  # run() backprops the sum of the 5 terms, per rank
        split = torch.cat([outs[0][1][name], outs[1][1][name]]) / 2
        assert rel_err(split, whole_grads[name]) < 1e-12, name


@pytest.mark.parametrize("agg", AGG_MODES)
def test_symmetric_clip(agg):
    """clip_eps_high=None: the ratio is clipped to [1 - clip_eps, 1 + clip_eps]."""
    options = dict(FULL, agg=agg, clip_eps_high=None)
    compare(random_batch(), options, tol=1e-10)
    compare(random_batch(dtype=torch.float32), dict(options, dual_clip=3.0), tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    batch = random_batch(B=5, T=300, dtype=dtype)
    compare(batch, dict(FULL, dual_clip=3.0), tol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("present", [(), ("ref_logp",), ("entropy",), ("values",)])
def test_optional_terms(present):
    batch = random_batch()
    keys = {"ref_logp": ("ref_logp",), "entropy": ("entropy",),
            "values": ("values", "old_values", "returns")}
    dropped = [k for name, ks in keys.items() if name not in present for k in ks]
    options = dict(FULL)
    if "ref_logp" not in present:
        options["kl_coef"] = 0.0
    if "entropy" not in present:
        options["entropy_coef"] = 0.0
    grads = [g for g in DIFFERENTIABLE if g not in dropped]
    compare(without(batch, *dropped), options, tol=1e-10, grads=grads)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_long_rows_span_several_tiles(agg):
    """T = 2500: three tiles of 1024 per row, with a full row, an empty one, a one-token
    row (its token in the middle tile), left and right padding: every aggregation mode
    combines each row's tiles before the rows."""
    batch = random_batch(B=6, T=2500)
    compare(batch, dict(FULL, agg=agg, dual_clip=3.0), tol=1e-10)
    compare(random_batch(B=3, T=2500, dtype=torch.float32), dict(FULL, agg=agg), tol=1e-5)


def test_gradcheck_float64():
    batch = random_batch(B=3, T=5)
    mask = batch.pop("mask")
    # keep ratios away from the clip boundaries, where the loss has kinks
    leaves = {k: v.nan_to_num().clone().requires_grad_(k in DIFFERENTIABLE)
              for k, v in batch.items()}
    leaves["old_logp"] = leaves["logp"].detach() + 0.01

    def loss(logp, entropy, values):
        out = rlhf_fast.ppo_loss(
            logp, leaves["old_logp"], leaves["advantages"], mask, ref_logp=leaves["ref_logp"],
            entropy=entropy, values=values, old_values=values.detach() + 0.01,
            returns=leaves["returns"], agg="seq-mean-token-mean", **FULL,
        )
        return out.loss, out.policy_loss, out.value_loss, out.kl, out.entropy

    args = (leaves["logp"], leaves["entropy"], leaves["values"])
    assert torch.autograd.gradcheck(loss, args, eps=1e-6, atol=1e-7)


def test_loss_is_the_weighted_sum_of_its_terms():
    batch = random_batch(dtype=torch.float32)
    out, _ = run(rlhf_fast.ppo_loss, batch, **FULL, agg="seq-mean-token-sum")
    combined = (out.policy_loss + FULL["kl_coef"] * out.kl - FULL["entropy_coef"] * out.entropy
                + FULL["vf_coef"] * out.value_loss)
    assert out.loss.item() == pytest.approx(combined.item(), rel=1e-6)


def test_statistics_are_detached_and_losses_are_not():
    batch = random_batch(dtype=torch.float32)
    out, _ = run(rlhf_fast.ppo_loss, batch, **FULL)
    assert all(t.requires_grad for t in out[:5])
    assert not any(t.requires_grad for t in out[5:])


# ----------------------------------------------------------------- edge cases


@pytest.mark.parametrize("shape", [(0, 7), (4, 0), (3, 1)])
def test_empty_and_single_token(shape):
    batch = random_batch(*shape) if shape[1] else None
    if batch is None:
        batch = {k: torch.zeros(shape, dtype=torch.float64)
                 for k in ("logp", "old_logp", "advantages", "ref_logp", "entropy", "values",
                           "old_values", "returns")}
        batch["mask"] = torch.zeros(shape, dtype=torch.bool)
    compare(batch, FULL, tol=1e-10)


def test_all_masked_batch_gives_zeros_and_zero_gradients():
    batch = random_batch()
    batch["mask"] = torch.zeros_like(batch["mask"])
    out, grads = run(rlhf_fast.ppo_loss, batch, **FULL)
    assert all(t.item() == 0 for t in out)
    assert all((g == 0).all() for g in grads.values())


def test_masked_nan_never_leaks():
    batch = random_batch(dtype=torch.float32)  # masked entries are NaN
    out, grads = run(rlhf_fast.ppo_loss, batch, **FULL, dual_clip=3.0)
    assert all(math.isfinite(t.item()) for t in out)
    for g in grads.values():
        assert torch.isfinite(g).all() and (g[~batch["mask"]] == 0).all()


def test_mask_dtypes_agree():
    batch = random_batch(dtype=torch.float32)
    base, _ = run(rlhf_fast.ppo_loss, batch, **FULL)
    for dtype in (torch.float32, torch.int64, torch.uint8):
        out, _ = run(rlhf_fast.ppo_loss, dict(batch, mask=batch["mask"].to(dtype)), **FULL)
        assert all(torch.equal(a, b) for a, b in zip(out, base))


def test_batch_invariance_of_gradients():
    batch = random_batch(B=9, T=50, dtype=torch.float32)
    batch = {k: v[[0, 2, 3, 4, 5, 6, 7, 8]] for k, v in batch.items()}  # drop the empty row
    _, full = run(rlhf_fast.ppo_loss, batch, **FULL, agg="seq-mean-token-sum-norm", max_len=64)
    half = {k: v[:4] for k, v in batch.items()}
    _, part = run(rlhf_fast.ppo_loss, half, **FULL, agg="seq-mean-token-sum-norm", max_len=64)
    for name in DIFFERENTIABLE:  # weights differ by B: 1 / (8 * 64) vs 1 / (4 * 64)
        assert torch.equal(part[name] / 2, full[name][:4])


def test_ppo_loss_module_matches_function():
    batch = random_batch(dtype=torch.float32)
    module = rlhf_fast.PPOLoss(**FULL, dual_clip=2.0)
    assert "dual_clip=2.0" in repr(module)
    a, _ = run(module, batch)
    b, _ = run(rlhf_fast.ppo_loss, batch, **FULL, dual_clip=2.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------- errors


def _call(**overrides):
    batch = random_batch(B=2, T=3, dtype=torch.float32)
    args = dict(batch, **FULL)
    args.update(overrides)
    return rlhf_fast.ppo_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"),
                              args.pop("mask"), **args)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"logp": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "logp must have dtype"),
        ({"logp": torch.zeros(2, 3, 1)}, ValueError, r"logp must have shape \[B, T\]"),
        ({"old_logp": torch.zeros(2, 4)}, ValueError, "old_logp must have logp's shape"),
        ({"advantages": [[0.0] * 3] * 2}, TypeError, "advantages must be a torch.Tensor"),
        ({"mask": torch.ones(3, 2, dtype=torch.bool)}, ValueError, "mask must have"),
        ({"clip_eps": -0.1}, ValueError, "clip_eps must be >= 0.0 and < 1.0, got -0.1"),
        ({"clip_eps": 1.0}, ValueError, "clip_eps"),
        ({"clip_eps_high": -0.2}, ValueError, "clip_eps_high must be >= 0.0"),
        ({"dual_clip": 1.0}, ValueError, "dual_clip must be > 1.0"),
        ({"value_clip": -1.0}, ValueError, "value_clip"),
        ({"kl_coef": -0.1}, ValueError, "kl_coef"),
        ({"vf_coef": float("nan")}, ValueError, "vf_coef"),
        ({"kl_estimator": "k4"}, ValueError, "kl_estimator must be one of"),
        ({"agg": "mean"}, ValueError, "agg must be one of"),
        ({"max_len": 0}, ValueError, "max_len must be a positive int"),
        ({"ref_logp": None}, ValueError, "ref_logp is required when kl_coef > 0"),
        ({"entropy": None}, ValueError, "entropy is required"),
        ({"returns": None}, ValueError, r"missing \['returns'\]"),
        ({"clip_eps": "0.2"}, TypeError, "clip_eps must be a float"),
        # finite, but not an fp32 number: the kernels take the settings as fp32
        ({"clip_eps_high": 1e300}, ValueError, "clip_eps_high must be representable in fp32"),
        ({"dual_clip": 1e39}, ValueError, "dual_clip must be representable in fp32"),
        ({"kl_coef": 1e-300}, ValueError, "kl_coef must be representable in fp32"),
        ({"entropy_coef": -1e300}, ValueError, "entropy_coef must be representable in fp32"),
        ({"value_clip": 1e300}, ValueError, "value_clip must be representable in fp32"),
        ({"vf_coef": 1e-40}, ValueError, r"vf_coef .* \[1.17549e-38, 3.40282e\+38\]"),
        ({"max_len": 2**63}, ValueError, r"max_len must be a positive int \(int64\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(kl_coef=-0.1), "kl_coef must be >= 0.0"),
        (dict(clip_eps=1.5), "clip_eps must be >= 0.0 and < 1.0"),
        (dict(vf_coef=1e300), "vf_coef must be representable in fp32"),
        (dict(agg="mean"), "agg must be one of"),
        (dict(kl_estimator="k4"), "kl_estimator must be one of"),
        (dict(max_len=0), "max_len must be a positive int"),
    ],
)
def test_ppo_loss_module_validates_where_it_is_built(options, match):
    with pytest.raises(ValueError, match=match):
        rlhf_fast.PPOLoss(**options)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_max_len_near_int64_max_on_both_backends(monkeypatch, backend):
    # B * max_len passes int64: the divisor must still be a float, not an overflow.
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    batch = random_batch()
    options = dict(FULL, agg="seq-mean-token-sum-norm")
    out, _ = run(rlhf_fast.ppo_loss, batch, **options, max_len=2**62)
    per_unit, _ = run(reference.ppo_loss, batch, **options, max_len=1)
    for name in ("loss", "policy_loss", "value_loss", "kl", "entropy"):
        expected = getattr(per_unit, name).item() / 2**62
        assert expected != 0.0
        assert getattr(out, name).item() == pytest.approx(expected, rel=1e-10), name


def _nan_at_a_valid_token(name):
    batch = random_batch()
    batch[name] = batch[name].clone()
    batch[name][0, 3] = float("nan")  # row 0 is all valid
    return batch


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_logp_at_a_valid_token_reaches_every_statistic_but_the_fractions(
    monkeypatch, backend
):
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    batch = _nan_at_a_valid_token("logp")
    out, _ = run(rlhf_fast.ppo_loss, batch, **FULL)
    ref, _ = run(reference.ppo_loss, batch, **FULL)
    for name in ("loss", "policy_loss", "kl", "approx_kl", "ratio_mean", "ratio_max"):
        assert math.isnan(getattr(out, name).item()), name
        assert math.isnan(getattr(ref, name).item()), name
    # fractions of strictly clipped tokens: a NaN is never one, as torch compares
    for name in ("clipfrac", "value_clipfrac", "value_loss", "entropy"):
        assert math.isfinite(getattr(out, name).item()), name
        assert getattr(out, name).item() == pytest.approx(getattr(ref, name).item(), abs=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("value_clip", [0.25, float("inf")])
def test_nan_old_values_at_a_valid_token_reach_the_value_loss(monkeypatch, backend, value_clip):
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    batch = _nan_at_a_valid_token("old_values")
    options = dict(FULL, value_clip=value_clip)
    out, g = run(rlhf_fast.ppo_loss, batch, **options)
    ref, g_ref = run(reference.ppo_loss, batch, **options)
    assert math.isnan(out.value_loss.item()) and math.isnan(out.loss.item())
    assert math.isnan(ref.value_loss.item())
    for name in ("policy_loss", "kl", "clipfrac", "value_clipfrac", "ratio_max"):
        assert getattr(out, name).item() == pytest.approx(getattr(ref, name).item(), abs=1e-12)
    # d value_loss / d values of that token: NaN, as at every NaN input (never a silent 0,
    # whichever gradient torch.clamp gives at NaN bounds); every other token finite, as
    # the reference
    assert math.isnan(g["values"][0, 3].item()) and math.isnan(g_ref["values"][0, 3].item())
    assert g["values"].isnan().sum() == 1
    torch.testing.assert_close(g["values"], g_ref["values"], equal_nan=True)


def test_value_clip_inf_disables_value_clipping():
    batch = random_batch()
    compare(batch, dict(FULL, value_clip=float("inf")), tol=1e-10)


def test_backend_switch_gives_same_result(monkeypatch):
    batch = random_batch(dtype=torch.float32)
    a, _ = run(rlhf_fast.ppo_loss, batch, **FULL)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    b, _ = run(rlhf_fast.ppo_loss, batch, **FULL)
    for x, y in itertools.zip_longest(a, b):
        assert x.item() == pytest.approx(y.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_time_dimension_gives_zero_on_both_backends(monkeypatch, backend):
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    empty = torch.zeros(2, 0)
    for agg in AGG_MODES:
        out = rlhf_fast.ppo_loss(empty, empty, empty, empty.bool(), agg=agg)
        assert out.loss.item() == 0.0, agg
