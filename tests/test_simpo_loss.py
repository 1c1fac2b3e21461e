"""rlhf_fast.simpo_loss: the fused kernels (through the interpreter) against the reference in
float64, the reference against a hand-computed case and the peers' formulas (TRL's
CPOTrainer.cpo_loss with loss_type="simpo", Liger's LigerFusedLinearSimPOFunction), and
the identity with reference-free length-normalised DPO at gamma = 0."""

import math

import pytest
import torch
import torch.nn.functional as F

import rlhf_fast
from helpers import kernel_backward, rel_err
from preference_helpers import NAN, TOL, as_float64, compare, lengths, random_upstream, run
from rlhf_fast import reference
from rlhf_fast.kernels import dpo_loss as dpo_kernel
from rlhf_fast.types import PREFERENCE_REDUCTIONS

POSITIONAL = ("policy_chosen", "policy_rejected", "chosen_lengths", "rejected_lengths")
GRADS = ("policy_chosen", "policy_rejected")
BACKWARD = kernel_backward("simpo_loss")
BETA = 0.125  # exact in fp32: an fp32 comparison measures the arithmetic, not the setting


def random_pairs(B=37, dtype=torch.float32, kind="int"):
    """Sequence log-probs -50 +- 5 randn (rounded to `dtype`) and lengths of `kind`."""
    pairs = {k: (-50 + 5 * torch.randn(B, dtype=torch.float64)).to(dtype) for k in GRADS}
    pairs["chosen_lengths"] = lengths(B, kind)
    pairs["rejected_lengths"] = lengths(B, kind)
    return pairs


def check(pairs, tol, **options):
    rewards = reference.simpo_loss(*(as_float64(pairs, GRADS)[k] for k in POSITIONAL),
                                   **options)
    scale = (rewards.chosen_rewards.abs() + rewards.rejected_rewards.abs()).mean().item()
    return compare(rlhf_fast.simpo_loss, reference.simpo_loss, pairs, POSITIONAL, GRADS,
                   BACKWARD, tol, scales={"reward_margin": scale},
                   accuracy_fields=("reward_accuracy",), **options)


# ----------------------------------------------------------------- the reference by hand


def s(x):
    return 1 / (1 + math.exp(-x))


def ls(x):
    return math.log(s(x))


# beta 0.5, gamma 0.25: pair 0 means a = -4 / 2, b = -9 / 3 (z = 0.25); pair 1 a = -6 / 1
# (length 0, clamped), b = -2 / 2 (z = -2.75)
HAND = dict(policy_chosen=[-4.0, -6.0], policy_rejected=[-9.0, -2.0])
HAND_Z = (0.25, -2.75)


def hand_pairs(dtype):
    pairs = {k: torch.tensor(v, dtype=dtype) for k, v in HAND.items()}
    pairs.update(chosen_lengths=torch.tensor([2, 0]), rejected_lengths=torch.tensor([3.0, 2.0]))
    return pairs


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_hand_computed_case(eps):
    expected = [-(1 - eps) * ls(z) - eps * ls(-z) for z in HAND_Z]
    options = dict(beta=0.5, gamma=0.25, label_smoothing=eps)
    for dtype in (torch.float64, torch.float32):
        pairs = hand_pairs(dtype)
        rel = 1e-12 if dtype == torch.float64 else 1e-6
        for fn in (reference.simpo_loss, rlhf_fast.simpo_loss):
            none = fn(*(pairs[k] for k in POSITIONAL), **options, reduction="none")
            assert none.loss.tolist() == pytest.approx(expected, rel=rel)
            assert none.chosen_rewards.tolist() == pytest.approx([-1.0, -3.0], rel=rel)
            assert none.rejected_rewards.tolist() == pytest.approx([-1.5, -0.5], rel=rel)
            assert none.reward_accuracy.item() == 0.5
            assert none.reward_margin.item() == pytest.approx(-1.0, rel=rel)
            for reduction, value in (("mean", sum(expected) / 2), ("sum", sum(expected))):
                out = fn(*(pairs[k] for k in POSITIONAL), **options, reduction=reduction)
                assert out.loss.item() == pytest.approx(value, rel=rel)
            # d/d pc_i of the mean: beta (eps s(z) - (1 - eps) s(-z)) / Lc_i / B
            _, g = run(fn, pairs, POSITIONAL, grads=GRADS, **options)
            d_z = [0.5 * (eps * s(z) - (1 - eps) * s(-z)) / 2 for z in HAND_Z]
            assert g["policy_chosen"].tolist() == pytest.approx(
                [d_z[0] / 2, d_z[1] / 1], rel=rel)
            assert g["policy_rejected"].tolist() == pytest.approx(
                [-d_z[0] / 3, -d_z[1] / 2], rel=rel)


def trl_cpo_simpo(policy_chosen_logps, policy_rejected_logps, beta, simpo_gamma,
                  label_smoothing):
    """TRL CPOTrainer.cpo_loss, loss_type="simpo", alpha = 0 (its AlphaPO off), on the
    per-token-mean log-probs its get_batch_logps(average_log_prob=True) gives; the trainer
    takes losses.mean()."""
    logits = policy_chosen_logps - policy_rejected_logps
    gamma_logratios = simpo_gamma / beta
    logits = logits - gamma_logratios
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    return losses.mean(), beta * policy_chosen_logps, beta * policy_rejected_logps


def liger_simpo(chosen_logps, rejected_logps, beta, gamma, label_smoothing):
    """Liger LigerFusedLinearSimPOFunction.preference_loss_fn (a sum over the B pairs
    divided by B)."""
    logits = beta * (chosen_logps - rejected_logps) - gamma
    loss = (-F.logsigmoid(logits) * (1 - label_smoothing)
            - F.logsigmoid(-logits) * label_smoothing).sum() / chosen_logps.shape[0]
    return loss, beta * chosen_logps, beta * rejected_logps


def princeton_simpo(pi_logratios, beta, gamma_beta_ratio):
    """The SimPO authors' simpo_loss (princeton-nlp/SimPO), label smoothing 0."""
    logits = pi_logratios - gamma_beta_ratio
    return -F.logsigmoid(beta * logits)


@pytest.mark.parametrize("beta, gamma, eps", [(0.1, 0.5, 0.0), (2.0, 1.0, 0.0),
                                              (2.5, 1.375, 0.2)])
def test_reference_matches_the_peers(beta, gamma, eps):
    pairs = random_pairs(B=16, dtype=torch.float64)  # lengths >= 1: TRL's mean has no clamp
    a = pairs["policy_chosen"] / pairs["chosen_lengths"]
    b = pairs["policy_rejected"] / pairs["rejected_lengths"]
    ours = reference.simpo_loss(*(pairs[k] for k in POSITIONAL), beta=beta, gamma=gamma,
                                label_smoothing=eps)
    for peer in (trl_cpo_simpo(a, b, beta, gamma, eps), liger_simpo(a, b, beta, gamma, eps)):
        assert rel_err(ours.loss, peer[0]) < 1e-14
        assert rel_err(ours.chosen_rewards, peer[1]) < 1e-14
        assert rel_err(ours.rejected_rewards, peer[2]) < 1e-14
    if eps == 0:  # the authors' gamma_beta_ratio r is gamma / beta
        none = reference.simpo_loss(*(pairs[k] for k in POSITIONAL), beta=beta, gamma=gamma,
                                    reduction="none")
        assert rel_err(none.loss, princeton_simpo(a - b, beta, gamma / beta)) < 1e-14


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["int", "zero", "float"])
def test_gamma_zero_is_reference_free_length_normalised_dpo(kind, dtype):
    pairs = random_pairs(B=13, dtype=dtype, kind=kind)
    upstream = random_upstream(13)
    dpo_pairs = dict(pairs, ref_chosen=None, ref_rejected=None)
    dpo_positional = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    for eps in (0.0, 0.2):
        for simpo, dpo in ((rlhf_fast.simpo_loss, rlhf_fast.dpo_loss),
                           (reference.simpo_loss, reference.dpo_loss)):
            out, g = run(simpo, pairs, POSITIONAL, upstream, GRADS, beta=BETA, gamma=0.0,
                         label_smoothing=eps, reduction="none")
            expected, g_dpo = run(dpo, dpo_pairs, dpo_positional, upstream, GRADS, beta=BETA,
                                  loss_type="sigmoid_norm", label_smoothing=eps,
                                  reduction="none")
            for x, y in zip(out, expected):  # the same arithmetic, operation for operation
                assert torch.equal(x, y)
            assert all(torch.equal(g[k], g_dpo[k]) for k in GRADS)


def test_gamma_shifts_the_margin():
    pairs = random_pairs(B=9, dtype=torch.float64)
    base = reference.simpo_loss(*(pairs[k] for k in POSITIONAL), beta=1.0, gamma=0.0,
                                reduction="none")
    shifted = reference.simpo_loss(*(pairs[k] for k in POSITIONAL), beta=1.0, gamma=0.75,
                                   reduction="none")
    z = base.chosen_rewards - base.rejected_rewards
    assert rel_err(shifted.loss, -F.logsigmoid(z - 0.75)) < 1e-14
    assert (shifted.loss > base.loss).all()


# ----------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("reduction", PREFERENCE_REDUCTIONS)
@pytest.mark.parametrize("gamma, eps", [(0.5, 0.0), (0.0, 0.1), (-1.5, 0.49)])
def test_matches_reference_float64(gamma, eps, reduction, poisoned):
    pairs = random_pairs(dtype=torch.float64)
    check(pairs, TOL[torch.float64], beta=BETA, gamma=gamma, label_smoothing=eps,
          reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_low_precision(dtype, poisoned):
    for reduction in ("none", "mean") if dtype == torch.float32 else ("sum",):
        pairs = random_pairs(dtype=dtype)
        check(pairs, TOL[torch.float32], beta=2.0, gamma=1.0, label_smoothing=0.1,
              reduction=reduction)


@pytest.mark.parametrize("kind", ["int32", "float", "zero"])
def test_lengths(kind):
    for dtype in (torch.float64, torch.float32):
        pairs = random_pairs(dtype=dtype, kind=kind)
        check(pairs, TOL[dtype], beta=BETA, reduction="none")
    # zero and fractional lengths are clamped to 1: the same as passing 1 there
    clamped = {k: (v.double().clamp(min=1) if k.endswith("lengths") else v)
               for k, v in pairs.items()}
    a = rlhf_fast.simpo_loss(*(pairs[k] for k in POSITIONAL), reduction="none")
    b = rlhf_fast.simpo_loss(*(clamped[k] for k in POSITIONAL), reduction="none")
    assert torch.equal(a.loss, b.loss)


def test_mixed_input_dtypes():
    pairs = random_pairs(dtype=torch.float32)
    pairs["policy_rejected"] = pairs["policy_rejected"].bfloat16()
    check(pairs, TOL[torch.float32], beta=BETA, reduction="none")
    pairs["policy_rejected"] = pairs["policy_rejected"].double()  # fp64 math
    check(pairs, TOL[torch.float64], beta=BETA, reduction="mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_margins(dtype):
    """Mean log-probs near 0 and -1e4: |z| up to ~1e4 with beta = 1, losses saturate to 0
    or grow linearly, nothing overflows."""
    B = 16
    pairs = {k: (-1e4 * torch.randint(0, 2, (B,)) - torch.randint(0, 64, (B,)) / 64).to(dtype)
             for k in GRADS}
    pairs["chosen_lengths"] = 2 ** torch.randint(0, 3, (B,))  # exact divisions
    pairs["rejected_lengths"] = 2 ** torch.randint(0, 3, (B,))
    out, _ = check(pairs, TOL[dtype], beta=1.0, gamma=0.5, reduction="none")
    assert torch.isfinite(out.loss).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_large_batch_crosses_blocks(reduction, poisoned):
    B = 2 * dpo_kernel.FWD_BLOCK + 77  # several forward iterations and backward programs
    for dtype in (torch.float64, torch.float32):
        check(random_pairs(B=B, dtype=dtype), TOL[dtype], beta=BETA, reduction=reduction)


def test_batch_of_one(poisoned):
    for reduction in PREFERENCE_REDUCTIONS:
        check(random_pairs(B=1, dtype=torch.float64), TOL[torch.float64], beta=BETA,
              reduction=reduction)


def test_nan_in_one_pair_stays_in_that_pair():
    pairs = random_pairs(B=9, dtype=torch.float64)
    pairs["policy_chosen"][4] = NAN
    upstream = random_upstream(9)
    out, g = run(rlhf_fast.simpo_loss, pairs, POSITIONAL, upstream, GRADS, reduction="none")
    ref, g_ref = run(reference.simpo_loss, pairs, POSITIONAL, upstream, GRADS,
                     reduction="none")
    others = torch.arange(9) != 4
    assert out.loss[4].isnan() and out.chosen_rewards[4].isnan()
    assert g["policy_chosen"][4].isnan() and g["policy_rejected"][4].isnan()
    assert rel_err(out.loss[others], ref.loss[others]) < TOL[torch.float64]
    for k in GRADS:
        assert torch.equal(g[k].isnan(), g_ref[k].isnan()), k
        assert rel_err(g[k][others], g_ref[k][others]) < TOL[torch.float64], k
    mean = rlhf_fast.simpo_loss(*(pairs[k] for k in POSITIONAL))
    assert mean.loss.isnan()


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(reduction):
    pairs = random_pairs(B=3, dtype=torch.float64)
    leaves = tuple(pairs[k].clone().requires_grad_(True) for k in GRADS)

    def loss(pc, pr):
        return rlhf_fast.simpo_loss(pc, pr, pairs["chosen_lengths"], pairs["rejected_lengths"],
                                    beta=2.0, gamma=1.0, label_smoothing=0.1,
                                    reduction=reduction).loss

    assert torch.autograd.gradcheck(loss, leaves, fast_mode=reduction == "none")


def test_statistics_are_detached_and_gradients_only_where_asked():
    pairs = random_pairs(B=6)
    out, g = run(rlhf_fast.simpo_loss, pairs, POSITIONAL, grads=("policy_rejected",))
    assert out.loss.requires_grad and not any(t.requires_grad for t in out[1:])
    assert set(g) == {"policy_rejected"}
    _, g_all = run(rlhf_fast.simpo_loss, pairs, POSITIONAL, grads=GRADS)
    assert torch.equal(g["policy_rejected"], g_all["policy_rejected"])


# ----------------------------------------------------------------- module and dispatch


def test_module_matches_function():
    pairs = random_pairs(B=10)
    settings = dict(beta=2.0, gamma=1.0, label_smoothing=0.1, reduction="none")
    module = rlhf_fast.SimPOLoss(**settings)
    assert "gamma=1.0" in repr(module)
    upstream = random_upstream(10)
    a, ga = run(module, pairs, POSITIONAL, upstream, GRADS)
    b, gb = run(rlhf_fast.simpo_loss, pairs, POSITIONAL, upstream, GRADS, **settings)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(ga[k], gb[k]) for k in GRADS)


def test_backend_switch_runs_the_reference(monkeypatch):
    pairs = random_pairs(B=8)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    out, g = run(rlhf_fast.simpo_loss, pairs, POSITIONAL, grads=GRADS)
    assert type(out.loss.grad_fn).__name__ != BACKWARD
    ref, g_ref = run(reference.simpo_loss, pairs, POSITIONAL, grads=GRADS)
    assert all(torch.equal(x, y) for x, y in zip(out, ref))
    assert all(torch.equal(g[k], g_ref[k]) for k in GRADS)


# ----------------------------------------------------------------- errors


def test_empty_batch_raises():
    z = torch.zeros(0)
    with pytest.raises(ValueError, match="policy_chosen"):
        rlhf_fast.simpo_loss(z, z, z, z)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": NAN}, ValueError, "beta"),
        ({"beta": 1e300}, ValueError, "beta must be representable in fp32"),
        ({"gamma": float("inf")}, ValueError, "gamma must be finite"),
        ({"gamma": NAN}, ValueError, "gamma"),
        ({"gamma": "0.5"}, TypeError, "gamma"),
        ({"label_smoothing": 0.5}, ValueError, "label_smoothing"),
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"simpo_gamma": 0.5}, TypeError, "unexpected option 'simpo_gamma'"),
        ({"policy_chosen": [-1.0, -2.0, -3.0]}, TypeError, "policy_chosen"),
        ({"policy_chosen": torch.zeros(3, dtype=torch.long)}, TypeError, "policy_chosen"),
        ({"policy_chosen": torch.zeros(3, 1)}, ValueError, "policy_chosen"),
        ({"policy_chosen": torch.tensor(-1.0)}, ValueError, "policy_chosen"),
        ({"policy_rejected": torch.zeros(4)}, ValueError, "policy_rejected"),
        ({"policy_rejected": torch.zeros(3, dtype=torch.int32)}, TypeError,
         "policy_rejected"),
        ({"policy_rejected": torch.zeros(3, device="meta")}, ValueError, "policy_rejected"),
        ({"chosen_lengths": None}, TypeError, "chosen_lengths"),
        ({"chosen_lengths": torch.ones(4)}, ValueError, "chosen_lengths"),
        ({"chosen_lengths": torch.ones(3, dtype=torch.bool)}, TypeError, "chosen_lengths"),
        ({"rejected_lengths": torch.tensor([4, -2, 3])}, ValueError,
         "rejected_lengths must be token counts >= 0, found -2"),
        ({"rejected_lengths": torch.tensor([1.0, NAN, 3.0])}, ValueError,
         "rejected_lengths must be token counts >= 0, found nan"),
        ({"rejected_lengths": torch.ones(3, device="meta")}, ValueError, "rejected_lengths"),
    ],
)
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    args = dict(random_pairs(B=3), beta=0.1)
    args.update(overrides)
    tensors = [args.pop(k) for k in POSITIONAL]
    with pytest.raises(error, match=match):
        rlhf_fast.simpo_loss(*tensors, **args)


def test_module_validates_where_it_is_built():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        rlhf_fast.SimPOLoss(label_smoothing=0.5)


def test_reference_float64_inputs_give_float64(poisoned):
    out = check(as_float64(random_pairs(B=5), GRADS), TOL[torch.float64], reduction="sum")[0]
    assert out.loss.dtype == torch.float64
