"""rlhf_fast.kto_loss: the fused kernels (through the interpreter) against the reference in
float64, and the reference against a hand-computed case and the peers' formulas (TRL's
KTOTrainer.compute_loss, loss_type "kto" and "apo_zero_unpaired", and Liger's
LigerFusedLinearKTOFunction.preference_loss_fn) rewritten in torch."""

import math

import pytest
import torch
import torch.nn.functional as F

import rlhf_fast
from helpers import kernel_backward, rel_err
from preference_helpers import NAN, TOL, run
from rlhf_fast import reference
from rlhf_fast.kernels import dpo_loss as dpo_kernel
from rlhf_fast.types import PREFERENCE_REDUCTIONS

POSITIONAL = ("policy_logps", "ref_logps", "desirable", "kl_ref")
GRADS = ("policy_logps", "ref_logps")
BACKWARD = kernel_backward("kto_loss")
BETA = 0.125


def random_examples(B=37, dtype=torch.float32, kl=True):
    """Sequence log-probs -50 +- 5 randn, reference ones +- 8 around them (log-ratios
    across the sigmoid's range at beta 0.125), random labels, a KL estimate in [-0.5,
    1.5) (clamped at 0 when negative)."""
    policy = -50 + 5 * torch.randn(B, dtype=torch.float64)
    return dict(policy_logps=policy.to(dtype),
                ref_logps=(policy + 8 * torch.randn(B, dtype=torch.float64)).to(dtype),
                desirable=torch.rand(B) < 0.5,
                kl_ref=(2 * torch.rand((), dtype=torch.float64) - 0.5).to(dtype) if kl else None)


def compare(examples, tol, grads=GRADS, **options):
    """All outputs and the gradients of `grads` against the float64 reference."""
    B = examples["policy_logps"].shape[0]
    upstream = (torch.randn(B if options.get("reduction") == "none" else (),
                            dtype=torch.float64).sign()
                * (0.5 + torch.rand(B if options.get("reduction") == "none" else (),
                                    dtype=torch.float64)))
    out, g = run(rlhf_fast.kto_loss, examples, POSITIONAL, upstream, grads, **options)
    as64 = {k: (v.double() if v is not None and v.is_floating_point() else v)
            for k, v in examples.items()}
    ref, g_ref = run(reference.kto_loss, as64, POSITIONAL, upstream, grads, **options)
    assert type(out.loss.grad_fn).__name__ == BACKWARD
    math64 = examples["policy_logps"].dtype == torch.float64
    scale = ref.rewards.abs().mean().item()
    for name, a, b in zip(ref._fields, out, ref):
        assert a.dtype == (torch.float64 if math64 else torch.float32), name
        assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan()), name
        a, b = a[~b.isnan()].double(), b[~b.isnan()].double()
        denom = max(b.norm().item(), scale if name in ("reward_margin", "chosen_reward",
                                                       "rejected_reward") else 0.0)
        err = (a - b).norm().item()
        assert (err / denom if denom else err) < tol, (name, err, denom)
    for name in g_ref:
        assert g[name].dtype == examples[name].dtype, name
        assert rel_err(g[name], g_ref[name]) < max(tol, TOL[examples[name].dtype]), name
    return out, g


# ----------------------------------------------------------------- the reference by hand


def s(x):
    return 1 / (1 + math.exp(-x))


def test_hand_computed_case():
    """beta 0.5, kl 0.5, weights 2 and 0.5: log-ratios 1.5 (desirable), -0.5 (undesirable),
    3.5 (undesirable): u = 0.5 (r - 0.5) = 0.5, -0.5, 1.5."""
    examples = dict(policy_logps=torch.tensor([-2.0, -5.0, -1.0], dtype=torch.float64),
                    ref_logps=torch.tensor([-3.5, -4.5, -4.5], dtype=torch.float64),
                    desirable=torch.tensor([True, False, False]),
                    kl_ref=torch.tensor(0.5, dtype=torch.float64))
    expected = [2 * (1 - s(0.5)), 0.5 * (1 - s(0.5)), 0.5 * (1 - s(-1.5))]
    options = dict(beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    for fn in (reference.kto_loss, rlhf_fast.kto_loss):
        out = fn(*(examples[k] for k in POSITIONAL), **options, reduction="none")
        assert out.loss.tolist() == pytest.approx(expected, rel=1e-12)
        assert out.rewards.tolist() == pytest.approx([0.75, -0.25, 1.75], rel=1e-12)
        assert out.chosen_reward.item() == pytest.approx(0.75, rel=1e-12)
        assert out.rejected_reward.item() == pytest.approx(0.75, rel=1e-12)
        assert out.reward_margin.item() == pytest.approx(0.0, abs=1e-15)
        assert out.kl.item() == 0.5
        mean = fn(*(examples[k] for k in POSITIONAL), **options)
        assert mean.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-12)
        # d/d policy of the mean: -w_d beta s'(u) / 3 (desirable), w_u beta s'(u) / 3
        _, g = run(fn, examples, POSITIONAL, grads=GRADS, **options)
        slope = [-2 * 0.5 * s(0.5) * s(-0.5) / 3, 0.5 * 0.5 * s(-0.5) * s(0.5) / 3,
                 0.5 * 0.5 * s(1.5) * s(-1.5) / 3]
        assert g["policy_logps"].tolist() == pytest.approx(slope, rel=1e-12)
        assert g["ref_logps"].tolist() == pytest.approx([-x for x in slope], rel=1e-12)


def trl_kto(policy_logps, ref_logps, labels, kl, beta, desirable_weight, undesirable_weight,
            loss_type="kto"):
    """TRL KTOTrainer.compute_loss from its chosen / rejected split to losses.nanmean(),
    with kl the gathered KL estimate (clamped at 0 and detached there)."""
    chosen_idx = torch.nonzero(labels, as_tuple=False).view(-1)
    rejected_idx = torch.nonzero(~labels, as_tuple=False).view(-1)
    chosen_logps = policy_logps.index_select(0, chosen_idx)
    rejected_logps = policy_logps.index_select(0, rejected_idx)
    ref_chosen_logps = ref_logps.index_select(0, chosen_idx)
    ref_rejected_logps = ref_logps.index_select(0, rejected_idx)
    kl = kl.detach().clamp(min=0)
    chosen_logratios = chosen_logps - ref_chosen_logps
    if loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    else:
        chosen_losses = 1 - F.sigmoid(beta * chosen_logratios)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_logratios = rejected_logps - ref_rejected_logps
    if loss_type == "kto":
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    else:
        rejected_losses = F.sigmoid(beta * rejected_logratios)
    rejected_rewards = beta * rejected_logratios.detach()
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses),
                       0)
    return losses.nanmean(), chosen_rewards, rejected_rewards


def liger_kto(log_prob, preference_labels, ref_log_prob, beta, kl):
    """Liger LigerFusedLinearKTOFunction.preference_loss_fn (a sum over B / B)."""
    logratios = log_prob - ref_log_prob if ref_log_prob is not None else log_prob
    multiplier = torch.where(preference_labels, 1, -1)
    if kl is not None:
        losses = 1 - F.sigmoid(beta * (logratios - kl) * multiplier)
    else:
        losses = 1 - F.sigmoid(beta * logratios * multiplier)
    rewards = beta * logratios
    return (losses.sum() / log_prob.shape[0], (rewards * preference_labels).sum(),
            (rewards * ~preference_labels).sum())


@pytest.mark.parametrize("kl", [0.3, -0.2])
def test_reference_matches_the_peers(kl):
    ex = random_examples(B=12, dtype=torch.float64)
    ex["desirable"][:2] = torch.tensor([True, False])  # both groups present
    kl_ref = torch.tensor(kl, dtype=torch.float64)
    for weights in ((1.0, 1.0), (1.33, 0.75)):
        ours = reference.kto_loss(ex["policy_logps"], ex["ref_logps"], ex["desirable"], kl_ref,
                                  beta=0.2, desirable_weight=weights[0],
                                  undesirable_weight=weights[1])
        peer = trl_kto(ex["policy_logps"], ex["ref_logps"], ex["desirable"], kl_ref, 0.2,
                       *weights)
        assert rel_err(ours.loss, peer[0]) < 1e-14
        assert rel_err(ours.chosen_reward, peer[1].mean()) < 1e-14
        assert rel_err(ours.rejected_reward, peer[2].mean()) < 1e-14
        assert rel_err(ours.rewards[ex["desirable"]], peer[1]) < 1e-14
    # TRL's apo_zero_unpaired is kl_ref None
    apo = reference.kto_loss(ex["policy_logps"], ex["ref_logps"], ex["desirable"], beta=0.2)
    peer = trl_kto(ex["policy_logps"], ex["ref_logps"], ex["desirable"], kl_ref, 0.2, 1.0, 1.0,
                   loss_type="apo_zero_unpaired")
    assert rel_err(apo.loss, peer[0]) < 1e-14
    # Liger (no weights; the KL passed as it is, so a clamped one here)
    for ref_logps in (ex["ref_logps"], None):
        ours = reference.kto_loss(ex["policy_logps"], ref_logps, ex["desirable"], kl_ref,
                                  beta=0.2)
        peer = liger_kto(ex["policy_logps"], ex["desirable"], ref_logps, 0.2,
                         kl_ref.clamp(min=0))
        n = ex["desirable"].sum()
        assert rel_err(ours.loss, peer[0]) < 1e-14
        assert rel_err(ours.chosen_reward, peer[1] / n) < 1e-14
        assert rel_err(ours.rejected_reward, peer[2] / (12 - n)) < 1e-14


# ----------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("reduction", PREFERENCE_REDUCTIONS)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.0)])
def test_matches_reference_float64(weights, reduction, poisoned):
    compare(random_examples(dtype=torch.float64), TOL[torch.float64], beta=BETA,
            desirable_weight=weights[0], undesirable_weight=weights[1], reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_low_precision(dtype, poisoned):
    for reduction in ("none", "mean") if dtype == torch.float32 else ("sum",):
        compare(random_examples(dtype=dtype), TOL[torch.float32], beta=BETA,
                undesirable_weight=1.5, reduction=reduction)


@pytest.mark.parametrize("variant", ["no kl", "no ref", "negative kl", "one group",
                                     "kl [1]", "ref only"])
def test_variants(variant, poisoned):
    ex = random_examples(dtype=torch.float64)
    grads = GRADS
    if variant == "no kl":
        ex["kl_ref"] = None
    elif variant == "no ref":
        ex["ref_logps"] = None
    elif variant == "negative kl":
        ex["kl_ref"] = torch.tensor(-0.25, dtype=torch.float64)
    elif variant == "one group":
        ex["desirable"][:] = True
    elif variant == "kl [1]":
        ex["kl_ref"] = ex["kl_ref"].reshape(1)
    else:
        grads = ("ref_logps",)
    out, g = compare(ex, TOL[torch.float64], grads=grads, beta=BETA, reduction="none")
    assert set(g) == {k for k in grads if ex[k] is not None}
    if variant == "negative kl":
        assert out.kl.item() == 0.0
    if variant == "one group":
        assert out.rejected_reward.isnan() and out.reward_margin.isnan()
        assert torch.isfinite(out.chosen_reward)


def test_kl_ref_gets_no_gradient():
    ex = random_examples(B=5, dtype=torch.float64)
    kl = ex["kl_ref"].clone().requires_grad_(True)
    for fn in (reference.kto_loss, rlhf_fast.kto_loss):
        out = fn(ex["policy_logps"].requires_grad_(True), ex["ref_logps"], ex["desirable"], kl)
        assert not out.kl.requires_grad
        (grad,) = torch.autograd.grad(out.loss, [kl], allow_unused=True)
        assert grad is None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_large_batch_crosses_blocks(reduction, poisoned):
    B = 2 * dpo_kernel.FWD_BLOCK + 77
    compare(random_examples(B=B, dtype=torch.float32), TOL[torch.float32], beta=BETA,
            reduction=reduction)


def test_batch_of_one(poisoned):
    for reduction in PREFERENCE_REDUCTIONS:
        compare(random_examples(B=1, dtype=torch.float64), TOL[torch.float64], beta=BETA,
                reduction=reduction)


def test_large_log_ratios_saturate():
    """|u| up to ~1e3: losses e^-|u| or near the weight, finite gradients, fp32 too."""
    ex = random_examples(B=16, dtype=torch.float64)
    ex["ref_logps"] = ex["policy_logps"] - 1e4 * torch.randn(16, dtype=torch.float64).sign()
    for dtype in (torch.float32, torch.float64):
        cast = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v)
                for k, v in ex.items()}
        out, _ = compare(cast, TOL[dtype], beta=0.1, reduction="none")
        assert torch.isfinite(out.loss).all()


def test_nan_in_one_example_stays_there():
    ex = random_examples(B=9, dtype=torch.float64)
    ex["policy_logps"][4] = NAN
    out, g = run(rlhf_fast.kto_loss, ex, POSITIONAL, None, GRADS, reduction="none")
    ref, g_ref = run(reference.kto_loss, ex, POSITIONAL, None, GRADS, reduction="none")
    others = torch.arange(9) != 4
    assert out.loss[4].isnan() and torch.isfinite(out.loss[others]).all()
    assert rel_err(out.loss[others], ref.loss[others]) < TOL[torch.float64]
    for k in GRADS:
        assert torch.equal(g[k].isnan(), g_ref[k].isnan()) and g[k][4].isnan(), k
    nan_kl = dict(ex, kl_ref=torch.tensor(NAN, dtype=torch.float64))
    assert rlhf_fast.kto_loss(*(nan_kl[k] for k in POSITIONAL), reduction="none"
                              ).loss.isnan().all()


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(reduction):
    ex = random_examples(B=4, dtype=torch.float64)
    leaves = tuple(ex[k].clone().requires_grad_(True) for k in GRADS)

    def loss(policy, ref):
        return rlhf_fast.kto_loss(policy, ref, ex["desirable"], ex["kl_ref"], beta=0.5,
                                  desirable_weight=1.33, reduction=reduction).loss

    assert torch.autograd.gradcheck(loss, leaves)


# ----------------------------------------------------------------- module and dispatch


def test_module_matches_function():
    ex = random_examples(B=10)
    settings = dict(beta=0.25, desirable_weight=1.33, undesirable_weight=0.5, reduction="sum")
    module = rlhf_fast.KTOLoss(**settings)
    assert "desirable_weight=1.33" in repr(module)
    a, ga = run(module, ex, POSITIONAL, None, GRADS)
    b, gb = run(rlhf_fast.kto_loss, ex, POSITIONAL, None, GRADS, **settings)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(ga[k], gb[k]) for k in GRADS)


def test_backend_switch_runs_the_reference(monkeypatch):
    ex = random_examples(B=8)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    out, g = run(rlhf_fast.kto_loss, ex, POSITIONAL, None, GRADS)
    assert type(out.loss.grad_fn).__name__ != BACKWARD
    ref, g_ref = run(reference.kto_loss, ex, POSITIONAL, None, GRADS)
    assert all(torch.equal(x, y) for x, y in zip(out, ref))
    assert all(torch.equal(g[k], g_ref[k]) for k in GRADS)


# ----------------------------------------------------------------- errors


def test_empty_batch_raises():
    z = torch.zeros(0)
    with pytest.raises(ValueError, match="policy_logps"):
        rlhf_fast.kto_loss(z, z, z.bool())


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"beta": 0.0}, ValueError, "beta"),
        ({"desirable_weight": -1.0}, ValueError, "desirable_weight must be a finite float"),
        ({"undesirable_weight": float("inf")}, ValueError, "undesirable_weight"),
        ({"undesirable_weight": NAN}, ValueError, "undesirable_weight"),
        ({"loss_type": "kto"}, TypeError, "unexpected option 'loss_type'"),
        ({"reduction": "batchmean"}, ValueError, "reduction"),
        ({"policy_logps": torch.zeros(3, 2)}, ValueError, "policy_logps"),
        ({"policy_logps": [1.0, 2.0, 3.0]}, TypeError, "policy_logps"),
        ({"ref_logps": torch.zeros(4)}, ValueError, "ref_logps"),
        ({"ref_logps": torch.zeros(3, dtype=torch.int64)}, TypeError, "ref_logps"),
        ({"desirable": torch.ones(3)}, TypeError, "desirable"),
        ({"desirable": torch.ones(2, dtype=torch.bool)}, ValueError, "desirable"),
        ({"desirable": None}, TypeError, "desirable"),
        ({"kl_ref": torch.zeros(2)}, ValueError, "kl_ref must be a 0-d or"),
        ({"kl_ref": torch.zeros(1, 1)}, ValueError, "kl_ref"),
        ({"kl_ref": 0.1}, TypeError, "kl_ref"),
        ({"kl_ref": torch.tensor(1)}, TypeError, "kl_ref"),
        ({"kl_ref": torch.tensor(0.1, device="meta")}, ValueError, "kl_ref"),
    ],
)
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    args = dict(random_examples(B=3))
    args.update(overrides)
    tensors = [args.pop(k) for k in POSITIONAL]
    with pytest.raises(error, match=match):
        rlhf_fast.kto_loss(*tensors, **args)
