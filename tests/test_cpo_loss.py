"""rlhf_fast.cpo_loss: the fused kernels (through the interpreter) against the reference in
float64, and the reference against a hand-computed case and TRL's CPOTrainer.cpo_loss
(with its NLL) and Liger's LigerFusedLinearCPOFunction rewritten in torch."""

import math

import pytest
import torch
import torch.nn.functional as F

import rlhf_fast
from helpers import kernel_backward, rel_err
from preference_helpers import NAN, TOL, as_float64, compare, lengths, random_upstream, run
from rlhf_fast import reference
from rlhf_fast.kernels import dpo_loss as dpo_kernel
from rlhf_fast.types import CPO_LOSS_TYPES, PREFERENCE_REDUCTIONS

POSITIONAL = ("policy_chosen", "policy_rejected", "chosen_lengths", "rejected_lengths")
GRADS = ("policy_chosen", "policy_rejected")
BACKWARD = kernel_backward("cpo_loss")
BETA = 0.125  # exact in fp32


def random_pairs(B=37, dtype=torch.float32, kind="int"):
    """Sequence log-probs -50 +- 5 randn (rounded to `dtype`) and lengths of `kind`."""
    pairs = {k: (-50 + 5 * torch.randn(B, dtype=torch.float64)).to(dtype) for k in GRADS}
    pairs["chosen_lengths"] = lengths(B, kind)
    pairs["rejected_lengths"] = lengths(B, kind)
    return pairs


def away_from_the_kink(pairs, beta):
    """Move the hinge's u = beta * (pc - pr) at least 0.1 from its kink at 1."""
    near = (beta * (pairs["policy_chosen"] - pairs["policy_rejected"]) - 1).abs() < 0.1
    return dict(pairs, policy_chosen=pairs["policy_chosen"] + near * 0.5 / beta)


def check(pairs, tol, **options):
    ref = reference.cpo_loss(*(as_float64(pairs, GRADS)[k] for k in POSITIONAL), **options)
    scale = (ref.chosen_rewards.abs() + ref.rejected_rewards.abs()).mean().item()
    return compare(rlhf_fast.cpo_loss, reference.cpo_loss, pairs, POSITIONAL, GRADS,
                   BACKWARD, tol, scales={"reward_margin": scale, "loss": scale},
                   accuracy_fields=("reward_accuracy",), **options)


# ----------------------------------------------------------------- the reference by hand


def ls(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_hand_computed_case(loss_type):
    # beta 0.5, alpha 2: sums pc = (-4, -6), pr = (-9, -2), lengths (2, 0 -> 1), (3, 2)
    pairs = dict(policy_chosen=torch.tensor([-4.0, -6.0], dtype=torch.float64),
                 policy_rejected=torch.tensor([-9.0, -2.0], dtype=torch.float64),
                 chosen_lengths=torch.tensor([2, 0]), rejected_lengths=torch.tensor([3, 2]))
    eps = 0.25 if loss_type == "sigmoid" else 0.0
    a, b = ((-2.0, -6.0), (-3.0, -1.0)) if loss_type == "ipo" else ((-4.0, -6.0), (-9.0, -2.0))
    terms = []
    for ai, bi in zip(a, b):
        u = 0.5 * (ai - bi)
        terms.append({"sigmoid": -(1 - eps) * ls(u) - eps * ls(-u), "hinge": max(0.0, 1 - u),
                      "ipo": (ai - bi - 1.0) ** 2}[loss_type])
    nll = 10.0 / 3.0  # -(-4 - 6) / (2 + 1)
    options = dict(beta=0.5, alpha=2.0, loss_type=loss_type, label_smoothing=eps)
    for fn in (reference.cpo_loss, rlhf_fast.cpo_loss):
        none = fn(*(pairs[k] for k in POSITIONAL), **options, reduction="none")
        assert none.loss.tolist() == pytest.approx([t + 2 * nll for t in terms], rel=1e-12)
        assert none.nll_loss.item() == pytest.approx(nll, rel=1e-12)
        assert none.chosen_rewards.tolist() == pytest.approx([0.5 * x for x in a], rel=1e-12)
        assert none.rejected_rewards.tolist() == pytest.approx([0.5 * x for x in b], rel=1e-12)
        mean = fn(*(pairs[k] for k in POSITIONAL), **options)
        assert mean.loss.item() == pytest.approx(sum(terms) / 2 + 2 * nll, rel=1e-12)
        total = fn(*(pairs[k] for k in POSITIONAL), **options, reduction="sum")
        assert total.loss.item() == pytest.approx(sum(terms) + 4 * nll, rel=1e-12)
        # alpha 0: no NLL in the loss, still reported
        bare = fn(*(pairs[k] for k in POSITIONAL), **dict(options, alpha=0.0), reduction="none")
        assert bare.loss.tolist() == pytest.approx(terms, rel=1e-12, abs=1e-15)
        assert bare.nll_loss.item() == pytest.approx(nll, rel=1e-12)


def trl_cpo(policy_chosen_logps, policy_rejected_logps, nll_loss, beta, label_smoothing,
            loss_type, cpo_alpha):
    """TRL CPOTrainer.cpo_loss (alpha = 0: no AlphaPO) and get_batch_loss_metrics'
    losses.mean() + cpo_alpha * policy_nll_loss, on the log-probs its concatenated_forward
    gives (means for ipo, sums otherwise)."""
    logits = policy_chosen_logps - policy_rejected_logps
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * policy_chosen_logps.detach()
    rejected_rewards = beta * policy_rejected_logps.detach()
    return losses.mean() + cpo_alpha * nll_loss, chosen_rewards, rejected_rewards


def liger_cpo(chosen_logps, rejected_logps, chosen_nll_sum, chosen_tokens, beta,
              label_smoothing, alpha):
    """Liger LigerFusedLinearCPOFunction.preference_loss_fn (sigmoid; a sum over B / B)
    plus LigerFusedLinearPreferenceBase's alpha * NLL (summed over the chosen tokens,
    divided by their count)."""
    logits = beta * (chosen_logps - rejected_logps)
    loss = (-F.logsigmoid(logits) * (1 - label_smoothing)
            - F.logsigmoid(-logits) * label_smoothing).sum() / chosen_logps.shape[0]
    return alpha * chosen_nll_sum / chosen_tokens + loss, beta * chosen_logps, \
        beta * rejected_logps


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_reference_matches_the_peers(loss_type):
    """On token log-probs: each answer's tokens give its sum (and mean), the chosen tokens
    together the cross-entropy TRL and Liger take as the NLL."""
    B = 6
    pairs = random_pairs(B=B, dtype=torch.float64)  # lengths >= 1 (TRL's mean: no clamp)
    tokens = {k: [-torch.rand(int(n), dtype=torch.float64) * 3 for n in pairs[f"{side}_lengths"]]
              for k, side in (("policy_chosen", "chosen"), ("policy_rejected", "rejected"))}
    sums = {k: torch.stack([t.sum() for t in v]) for k, v in tokens.items()}
    means = {k: torch.stack([t.mean() for t in v]) for k, v in tokens.items()}
    nll = -torch.cat(tokens["policy_chosen"]).mean()  # CrossEntropyLoss over chosen tokens
    pairs.update(sums)
    beta, eps = 0.25, (0.1 if loss_type == "sigmoid" else 0.0)
    seen = means if loss_type == "ipo" else sums
    ours = reference.cpo_loss(*(pairs[k] for k in POSITIONAL), beta=beta, alpha=0.7,
                              loss_type=loss_type, label_smoothing=eps)
    peers = [trl_cpo(seen["policy_chosen"], seen["policy_rejected"], nll, beta, eps,
                     loss_type, 0.7)]
    if loss_type == "sigmoid":
        peers.append(liger_cpo(sums["policy_chosen"], sums["policy_rejected"],
                               -torch.cat(tokens["policy_chosen"]).sum(),
                               pairs["chosen_lengths"].sum(), beta, eps, 0.7))
    for peer in peers:
        assert rel_err(ours.loss, peer[0]) < 1e-14
        assert rel_err(ours.chosen_rewards, peer[1]) < 1e-14
        assert rel_err(ours.rejected_rewards, peer[2]) < 1e-14
    assert rel_err(ours.nll_loss, nll) < 1e-14


def test_reductions_and_the_nll_share():
    """none's mean is the mean reduction, its sum the sum reduction: each pair carries
    alpha * nll."""
    pairs = random_pairs(B=8, dtype=torch.float64)
    for fn in (reference.cpo_loss, rlhf_fast.cpo_loss):
        out = {r: fn(*(pairs[k] for k in POSITIONAL), alpha=0.5, reduction=r)
               for r in PREFERENCE_REDUCTIONS}
        assert out["mean"].loss.item() == pytest.approx(out["none"].loss.mean().item(),
                                                        rel=1e-13)
        assert out["sum"].loss.item() == pytest.approx(out["none"].loss.sum().item(),
                                                       rel=1e-13)


# ----------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("reduction", PREFERENCE_REDUCTIONS)
@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_matches_reference_float64(loss_type, alpha, reduction, poisoned):
    pairs = away_from_the_kink(random_pairs(dtype=torch.float64, kind="zero"), BETA)
    eps = 0.1 if loss_type == "sigmoid" else 0.0
    check(pairs, TOL[torch.float64], beta=BETA, loss_type=loss_type, alpha=alpha,
          label_smoothing=eps, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_matches_reference_low_precision(loss_type, dtype, poisoned):
    for reduction in ("none", "mean") if dtype == torch.float32 else ("sum",):
        pairs = away_from_the_kink(random_pairs(dtype=dtype, kind="float"), BETA)
        check(pairs, TOL[torch.float32], beta=BETA, loss_type=loss_type, alpha=1.5,
              reduction=reduction)


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_large_batch_crosses_blocks(loss_type, reduction, poisoned):
    B = 2 * dpo_kernel.FWD_BLOCK + 77
    pairs = away_from_the_kink(random_pairs(B=B, dtype=torch.float32), BETA)
    check(pairs, TOL[torch.float32], beta=BETA, loss_type=loss_type, reduction=reduction)


def test_batch_of_one(poisoned):
    for reduction in PREFERENCE_REDUCTIONS:
        for loss_type in CPO_LOSS_TYPES:
            pairs = away_from_the_kink(random_pairs(B=1, dtype=torch.float64), BETA)
            check(pairs, TOL[torch.float64], beta=BETA, loss_type=loss_type,
                  reduction=reduction)


def test_mixed_input_dtypes():
    pairs = random_pairs(dtype=torch.float32)
    pairs["policy_chosen"] = pairs["policy_chosen"].half()
    check(pairs, TOL[torch.float32], beta=BETA, reduction="none")
    pairs["policy_rejected"] = pairs["policy_rejected"].double()
    pairs["policy_chosen"] = pairs["policy_chosen"].float()
    check(pairs, TOL[torch.float64], beta=BETA, loss_type="ipo")


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_nan_rejected_stays_in_its_pair_nan_chosen_reaches_the_nll(alpha):
    pairs = random_pairs(B=9, dtype=torch.float64)
    others = torch.arange(9) != 4
    upstream = random_upstream(9)
    bad = dict(pairs, policy_rejected=pairs["policy_rejected"].clone())
    bad["policy_rejected"][4] = NAN
    out, g = run(rlhf_fast.cpo_loss, bad, POSITIONAL, upstream, GRADS, alpha=alpha,
                 reduction="none")
    ref, g_ref = run(reference.cpo_loss, bad, POSITIONAL, upstream, GRADS, alpha=alpha,
                     reduction="none")
    assert out.loss[4].isnan() and torch.isfinite(out.loss[others]).all()
    for k in GRADS:
        assert torch.equal(g[k].isnan(), g_ref[k].isnan()), k
        assert rel_err(g[k][others], g_ref[k][others]) < TOL[torch.float64], k
    bad = dict(pairs, policy_chosen=pairs["policy_chosen"].clone())
    bad["policy_chosen"][4] = NAN
    out, g = run(rlhf_fast.cpo_loss, bad, POSITIONAL, upstream, GRADS, alpha=alpha,
                 reduction="none")
    ref, g_ref = run(reference.cpo_loss, bad, POSITIONAL, upstream, GRADS, alpha=alpha,
                     reduction="none")
    assert out.nll_loss.isnan()
    assert torch.equal(out.loss.isnan(), ref.loss.isnan())
    assert out.loss.isnan().all() == (alpha > 0)
    for k in GRADS:
        assert torch.equal(g[k].isnan(), g_ref[k].isnan()), k


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_gradcheck_float64(loss_type, reduction):
    pairs = away_from_the_kink(random_pairs(B=3, dtype=torch.float64), 0.5)
    leaves = tuple(pairs[k].clone().requires_grad_(True) for k in GRADS)

    def loss(pc, pr):
        return rlhf_fast.cpo_loss(pc, pr, pairs["chosen_lengths"], pairs["rejected_lengths"],
                                  beta=0.5, loss_type=loss_type, alpha=1.5,
                                  reduction=reduction).loss

    assert torch.autograd.gradcheck(loss, leaves)


def test_gradients_only_where_asked():
    pairs = random_pairs(B=6)
    out, g = run(rlhf_fast.cpo_loss, pairs, POSITIONAL, grads=("policy_chosen",))
    assert set(g) == {"policy_chosen"} and not any(t.requires_grad for t in out[1:])
    _, g_all = run(rlhf_fast.cpo_loss, pairs, POSITIONAL, grads=GRADS)
    assert torch.equal(g["policy_chosen"], g_all["policy_chosen"])


# ----------------------------------------------------------------- module and dispatch


def test_module_matches_function():
    pairs = random_pairs(B=10)
    settings = dict(beta=0.25, loss_type="ipo", alpha=0.5, reduction="sum")
    module = rlhf_fast.CPOLoss(**settings)
    assert "alpha=0.5" in repr(module)
    a, ga = run(module, pairs, POSITIONAL, grads=GRADS)
    b, gb = run(rlhf_fast.cpo_loss, pairs, POSITIONAL, grads=GRADS, **settings)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(ga[k], gb[k]) for k in GRADS)


def test_backend_switch_runs_the_reference(monkeypatch):
    pairs = random_pairs(B=8)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    out, g = run(rlhf_fast.cpo_loss, pairs, POSITIONAL, grads=GRADS, loss_type="hinge")
    assert type(out.loss.grad_fn).__name__ != BACKWARD
    ref, g_ref = run(reference.cpo_loss, pairs, POSITIONAL, grads=GRADS, loss_type="hinge")
    assert all(torch.equal(x, y) for x, y in zip(out, ref))
    assert all(torch.equal(g[k], g_ref[k]) for k in GRADS)


# ----------------------------------------------------------------- errors


def test_empty_batch_raises():
    z = torch.zeros(0)
    with pytest.raises(ValueError, match="policy_chosen"):
        rlhf_fast.cpo_loss(z, z, z, z)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": float("inf")}, ValueError, "beta"),
        ({"loss_type": "simpo"}, ValueError, "loss_type"),
        ({"loss_type": "alphapo"}, ValueError, "loss_type"),
        ({"alpha": -0.1}, ValueError, "alpha must be >= 0.0"),
        ({"alpha": NAN}, ValueError, "alpha"),
        ({"alpha": True}, TypeError, "alpha"),
        ({"cpo_alpha": 1.0}, TypeError, "unexpected option 'cpo_alpha'"),
        ({"label_smoothing": 0.5}, ValueError, "label_smoothing"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, ValueError,
         "label_smoothing must be 0 for loss_type 'hinge'"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, ValueError, "label_smoothing"),
        ({"reduction": None}, ValueError, "reduction"),
        ({"policy_chosen": torch.zeros(3, 1)}, ValueError, "policy_chosen"),
        ({"policy_chosen": [-1.0, -2.0, -3.0]}, TypeError, "policy_chosen"),
        ({"policy_rejected": torch.zeros(2)}, ValueError, "policy_rejected"),
        ({"policy_rejected": torch.zeros(3, dtype=torch.bool)}, TypeError, "policy_rejected"),
        ({"chosen_lengths": torch.tensor([1, -1, 2])}, ValueError,
         "chosen_lengths must be token counts >= 0, found -1"),
        ({"rejected_lengths": torch.tensor([1.0, NAN, 2.0])}, ValueError,
         "rejected_lengths must be token counts >= 0, found nan"),
        ({"rejected_lengths": torch.ones(3, 1)}, ValueError, "rejected_lengths"),
        ({"chosen_lengths": torch.ones(3, device="meta")}, ValueError, "chosen_lengths"),
    ],
)
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    args = dict(random_pairs(B=3))
    args.update(overrides)
    tensors = [args.pop(k) for k in POSITIONAL]
    with pytest.raises(error, match=match):
        rlhf_fast.cpo_loss(*tensors, **args)


def test_module_validates_where_it_is_built():
    with pytest.raises(ValueError, match="label_smoothing must be 0 for loss_type 'hinge'"):
        rlhf_fast.CPOLoss(loss_type="hinge", label_smoothing=0.1)
