"""rlhf_fast.orpo_loss: the fused kernels (through the interpreter) against the reference in
float64, the reference against a hand-computed case and the peers' formulas (TRL's
ORPOTrainer.odds_ratio_loss with its NLL, Liger's LigerFusedLinearORPOFunction), log1mexp
near 0 and a mean log-prob of exactly 0."""

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
BACKWARD = kernel_backward("orpo_loss")
BETA = 0.125


def random_pairs(B=37, dtype=torch.float32, kind="int"):
    """Per-token means in (-3, -0.01) times the answer lengths of `kind` (rounded to
    `dtype`): log-probs of plausible answers."""
    pairs = {"chosen_lengths": lengths(B, kind), "rejected_lengths": lengths(B, kind)}
    for k, side in (("policy_chosen", "chosen"), ("policy_rejected", "rejected")):
        mean = -0.01 - 3 * torch.rand(B, dtype=torch.float64)
        pairs[k] = (mean * pairs[f"{side}_lengths"].double().clamp(min=1)).to(dtype)
    return pairs


def check(pairs, tol, **options):
    ref = reference.orpo_loss(*(as_float64(pairs, GRADS)[k] for k in POSITIONAL), **options)
    scale = (ref.chosen_rewards.abs() + ref.rejected_rewards.abs()).mean().item()
    odds = (ref.chosen_rewards.abs() + ref.rejected_rewards.abs()).mean().item() / BETA
    return compare(rlhf_fast.orpo_loss, reference.orpo_loss, pairs, POSITIONAL, GRADS,
                   BACKWARD, tol, scales={"reward_margin": scale, "log_odds_chosen": odds},
                   accuracy_fields=("reward_accuracy",), **options)


# ----------------------------------------------------------------- the reference by hand


def test_hand_computed_case():
    """Pair 0: P(chosen) per token 1/2 (lc = -ln 2, log1mexp's switch), P(rejected) 1/4:
    odds 1 and 1/3, log odds ratio ln 3, log s = ln 3/4. Pair 1: P 0.2 and 0.6: odds 1/4
    and 3/2, ratio 1/6, log s = ln 1/7."""
    lc, lr = (math.log(0.5), math.log(0.2)), (math.log(0.25), math.log(0.6))
    pairs = dict(chosen_lengths=torch.tensor([2, 0]), rejected_lengths=torch.tensor([1, 3]))
    pairs["policy_chosen"] = torch.tensor([2 * lc[0], lc[1]], dtype=torch.float64)
    pairs["policy_rejected"] = torch.tensor([lr[0], 3 * lr[1]], dtype=torch.float64)
    nll = -(2 * lc[0] + lc[1]) / 3
    ratio = [math.log(3 / 4), math.log(1 / 7)]
    log_odds = [math.log(3), math.log(1 / 6)]
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        tensors = {k: (v.to(dtype) if k in GRADS else v) for k, v in pairs.items()}
        for fn in (reference.orpo_loss, rlhf_fast.orpo_loss):
            out = fn(*(tensors[k] for k in POSITIONAL), beta=0.5, reduction="none")
            assert out.loss.tolist() == pytest.approx([nll - 0.5 * r for r in ratio], rel=rel)
            assert out.nll_loss.item() == pytest.approx(nll, rel=rel)
            assert out.log_odds_ratio.item() == pytest.approx(sum(ratio) / 2, rel=rel)
            assert out.log_odds_chosen.item() == pytest.approx(sum(log_odds) / 2, rel=rel)
            assert out.chosen_rewards.tolist() == pytest.approx([0.5 * x for x in lc], rel=rel)
            assert out.rejected_rewards.tolist() == pytest.approx([0.5 * x for x in lr],
                                                                  rel=rel)
            mean = fn(*(tensors[k] for k in POSITIONAL), beta=0.5)
            assert mean.loss.item() == pytest.approx(nll - 0.25 * sum(ratio), rel=rel)


def trl_log1mexp(x):
    t = -0.6931471805599453
    return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def trl_orpo(policy_chosen_logps, policy_rejected_logps, policy_nll_loss, beta):
    """TRL ORPOTrainer.odds_ratio_loss and get_batch_loss_metrics' policy_nll_loss -
    losses.mean()."""
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        trl_log1mexp(policy_chosen_logps) - trl_log1mexp(policy_rejected_logps))
    ratio = F.logsigmoid(log_odds)
    losses = beta * ratio
    chosen_rewards = beta * policy_chosen_logps.detach()
    rejected_rewards = beta * policy_rejected_logps.detach()
    return (policy_nll_loss - losses.mean(), chosen_rewards, rejected_rewards,
            torch.mean(ratio), torch.mean(log_odds))


def liger_orpo(chosen_logps, rejected_logps, nll_loss, beta):
    """Liger LigerFusedLinearORPOFunction.preference_loss_fn (naive log1p(-exp)) plus the
    base's alpha (1) * NLL."""
    log_odds = (chosen_logps - rejected_logps) - (
        torch.log1p(-torch.exp(chosen_logps)) - torch.log1p(-torch.exp(rejected_logps)))
    ratio = F.logsigmoid(log_odds)
    B = chosen_logps.shape[0]
    return (nll_loss - beta * ratio.sum() / B, beta * chosen_logps, beta * rejected_logps,
            ratio.sum() / B, log_odds.sum() / B)


def test_reference_matches_the_peers():
    B = 6
    pairs = random_pairs(B=B, dtype=torch.float64)
    tokens = {k: [-0.01 - torch.rand(int(n), dtype=torch.float64) * 3
                  for n in pairs[f"{side}_lengths"]]
              for k, side in (("policy_chosen", "chosen"), ("policy_rejected", "rejected"))}
    pairs.update({k: torch.stack([t.sum() for t in v]) for k, v in tokens.items()})
    means = {k: torch.stack([t.mean() for t in v]) for k, v in tokens.items()}
    nll = -torch.cat(tokens["policy_chosen"]).mean()  # the answers' tokens (Liger's default)
    ours = reference.orpo_loss(*(pairs[k] for k in POSITIONAL), beta=0.2)
    for peer in (trl_orpo(means["policy_chosen"], means["policy_rejected"], nll, 0.2),
                 liger_orpo(means["policy_chosen"], means["policy_rejected"], nll, 0.2)):
        for name, value in zip(("loss", "chosen_rewards", "rejected_rewards",
                                "log_odds_ratio", "log_odds_chosen"), peer):
            assert rel_err(getattr(ours, name), value) < 1e-13, name
    assert rel_err(ours.nll_loss, nll) < 1e-14


def test_log1mexp_is_accurate_near_zero_and_at_the_switch():
    x = torch.tensor([-1e-300, -1e-20, -1e-10, -1e-4, -0.5, -math.log(2), -0.7, -1.0, -40.0,
                      -800.0, -math.inf], dtype=torch.float64)
    # log(1 - e^x) independently: the log of Python's expm1 (relative error 1 ulp) down
    # to -1, below it the series -sum_k e^(kx) / k (e^x <= 1/e: 40 terms are exact)
    exact = [math.log(-math.expm1(v)) if v >= -1 else
             -sum(math.exp(k * v) / k for k in range(1, 41)) for v in x.tolist()]
    assert reference.log1mexp(x).tolist() == pytest.approx(exact, rel=1e-15, abs=1e-300)
    assert reference.log1mexp(torch.zeros(1, dtype=torch.float64)).item() == -math.inf
    assert reference.log1mexp(torch.ones(1, dtype=torch.float64)).isnan()
    # the gradient is finite everywhere below 0 (the other branch of the where included)
    leaf = x[:-1].clone().requires_grad_(True)
    reference.log1mexp(leaf).sum().backward()
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_keep_precision_near_zero(dtype):
    """Per-token means from -1e-30 to -0.7: the log odds ratio's log(1 - e^lc) is a
    large number known to full precision (Liger's log1p(-exp) is off there)."""
    lc = torch.tensor([-1e-30, -1e-12, -1e-7, -1e-4, -0.01, -0.6931, -0.6932, -0.7],
                      dtype=torch.float64)
    B = lc.shape[0]
    pairs = dict(policy_chosen=lc.to(dtype), policy_rejected=torch.full((B,), -1.5, dtype=dtype),
                 chosen_lengths=torch.ones(B), rejected_lengths=torch.ones(B))
    options = dict(beta=1.0, reduction="none")
    for i in range(B):  # one pair at a time: log_odds_chosen is that pair's log odds ratio
        one = {k: v[i:i + 1] for k, v in pairs.items()}
        out = rlhf_fast.orpo_loss(*(one[k] for k in POSITIONAL), **options)
        ref = reference.orpo_loss(*(as_float64(one, GRADS)[k] for k in POSITIONAL), **options)
        assert rel_err(out.log_odds_chosen, ref.log_odds_chosen) < TOL[dtype]
        assert rel_err(out.log_odds_ratio, ref.log_odds_ratio) < TOL[dtype]
    check(pairs, TOL[dtype], beta=1.0, reduction="none")


def test_certain_chosen_answer_has_the_limit_gradient():
    """lc = 0 exactly: log odds +inf, odds-ratio term 0, d/d lc the limit
    -beta e^lr / (1 - e^lr); the one-sided difference quotient tends to it."""
    pairs = dict(policy_chosen=torch.tensor([0.0, -2.0], dtype=torch.float64),
                 policy_rejected=torch.tensor([-3.0, -1.0], dtype=torch.float64),
                 chosen_lengths=torch.tensor([3, 2]), rejected_lengths=torch.tensor([2, 1]))
    lr = -1.5
    limit = -0.5 * math.exp(lr) / -math.expm1(lr)
    for fn in (reference.orpo_loss, rlhf_fast.orpo_loss):
        out, g = run(fn, pairs, POSITIONAL, grads=GRADS, beta=0.5, reduction="none",
                     upstream=torch.tensor([1.0, 0.0], dtype=torch.float64))
        assert out.loss[0].item() == out.nll_loss.item()  # the odds-ratio term is 0
        assert out.log_odds_chosen.item() == math.inf
        nll_share = 2 * -1.0 / 5  # both pairs carry the NLL: d nll / d pc = -1 / 5
        assert g["policy_chosen"][0].item() == pytest.approx(limit / 3 + nll_share / 2,
                                                             rel=1e-12)
        assert g["policy_rejected"][0].item() == 0.0
    h = 1e-7
    moved = dict(pairs, policy_chosen=torch.tensor([-3 * h, -2.0], dtype=torch.float64))
    term = (reference.orpo_loss(*(moved[k] for k in POSITIONAL), beta=0.5,
                                reduction="none").loss[0]
            - reference.orpo_loss(*(moved[k] for k in POSITIONAL), beta=0.5).nll_loss)
    assert term.item() / -h == pytest.approx(limit, rel=1e-5)


def test_zero_or_positive_means():
    """lr = 0: an infinite loss; lc = lr = 0 or a positive mean: NaN, in both backends."""
    pairs = dict(policy_chosen=torch.tensor([-1.0, 0.0, 0.5], dtype=torch.float64),
                 policy_rejected=torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64),
                 chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(3))
    for fn in (reference.orpo_loss, rlhf_fast.orpo_loss):
        out = fn(*(pairs[k] for k in POSITIONAL), reduction="none")
        assert out.loss[0].item() == math.inf
        assert out.loss[1:].isnan().all()


# ----------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("reduction", PREFERENCE_REDUCTIONS)
@pytest.mark.parametrize("kind", ["int", "zero", "float"])
def test_matches_reference_float64(kind, reduction, poisoned):
    check(random_pairs(dtype=torch.float64, kind=kind), TOL[torch.float64], beta=BETA,
          reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_low_precision(dtype, poisoned):
    for reduction in ("none", "mean") if dtype == torch.float32 else ("sum",):
        check(random_pairs(dtype=dtype), TOL[torch.float32], beta=BETA, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_large_batch_crosses_blocks(reduction, poisoned):
    B = 2 * dpo_kernel.FWD_BLOCK + 77
    check(random_pairs(B=B, dtype=torch.float32), TOL[torch.float32], beta=BETA,
          reduction=reduction)


def test_batch_of_one(poisoned):
    for reduction in PREFERENCE_REDUCTIONS:
        check(random_pairs(B=1, dtype=torch.float64), TOL[torch.float64], beta=BETA,
              reduction=reduction)


def test_nan_rejected_stays_in_its_pair():
    pairs = random_pairs(B=9, dtype=torch.float64)
    pairs["policy_rejected"][4] = NAN
    upstream = random_upstream(9)
    out, g = run(rlhf_fast.orpo_loss, pairs, POSITIONAL, upstream, GRADS, reduction="none")
    ref, g_ref = run(reference.orpo_loss, pairs, POSITIONAL, upstream, GRADS,
                     reduction="none")
    others = torch.arange(9) != 4
    assert out.loss[4].isnan() and torch.isfinite(out.loss[others]).all()
    assert rel_err(out.loss[others], ref.loss[others]) < TOL[torch.float64]
    for k in GRADS:
        assert torch.equal(g[k].isnan(), g_ref[k].isnan()), k
        assert rel_err(g[k][others], g_ref[k][others]) < TOL[torch.float64], k


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(reduction):
    pairs = random_pairs(B=3, dtype=torch.float64)
    leaves = tuple(pairs[k].clone().requires_grad_(True) for k in GRADS)

    def loss(pc, pr):
        return rlhf_fast.orpo_loss(pc, pr, pairs["chosen_lengths"], pairs["rejected_lengths"],
                                   beta=0.5, reduction=reduction).loss

    assert torch.autograd.gradcheck(loss, leaves)


def test_gradients_only_where_asked():
    pairs = random_pairs(B=6)
    out, g = run(rlhf_fast.orpo_loss, pairs, POSITIONAL, grads=("policy_rejected",))
    assert set(g) == {"policy_rejected"} and not any(t.requires_grad for t in out[1:])
    _, g_all = run(rlhf_fast.orpo_loss, pairs, POSITIONAL, grads=GRADS)
    assert torch.equal(g["policy_rejected"], g_all["policy_rejected"])


# ----------------------------------------------------------------- module and dispatch


def test_module_matches_function():
    pairs = random_pairs(B=10)
    module = rlhf_fast.ORPOLoss(beta=0.25, reduction="none")
    assert "beta=0.25" in repr(module)
    upstream = random_upstream(10)
    a, ga = run(module, pairs, POSITIONAL, upstream, GRADS)
    b, gb = run(rlhf_fast.orpo_loss, pairs, POSITIONAL, upstream, GRADS, beta=0.25,
                reduction="none")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(ga[k], gb[k]) for k in GRADS)


def test_backend_switch_runs_the_reference(monkeypatch):
    pairs = random_pairs(B=8)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    out, g = run(rlhf_fast.orpo_loss, pairs, POSITIONAL, grads=GRADS)
    assert type(out.loss.grad_fn).__name__ != BACKWARD
    ref, g_ref = run(reference.orpo_loss, pairs, POSITIONAL, grads=GRADS)
    assert all(torch.equal(x, y) for x, y in zip(out, ref))
    assert all(torch.equal(g[k], g_ref[k]) for k in GRADS)


# ----------------------------------------------------------------- errors


def test_empty_batch_raises():
    z = torch.zeros(0)
    with pytest.raises(ValueError, match="policy_chosen"):
        rlhf_fast.orpo_loss(z, z, z, z)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": -1.0}, ValueError, "beta"),
        ({"beta": "0.1"}, TypeError, "beta"),
        ({"alpha": 1.0}, TypeError, "unexpected option 'alpha'"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"policy_chosen": torch.zeros(3, dtype=torch.int64)}, TypeError, "policy_chosen"),
        ({"policy_rejected": torch.zeros(3, 2)}, ValueError, "policy_rejected"),
        ({"chosen_lengths": torch.tensor([1, 2, -3])}, ValueError,
         "chosen_lengths must be token counts >= 0, found -3"),
        ({"rejected_lengths": [1, 2, 3]}, TypeError, "rejected_lengths"),
    ],
)
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    args = dict(random_pairs(B=3))
    args.update(overrides)
    tensors = [args.pop(k) for k in POSITIONAL]
    with pytest.raises(error, match=match):
        rlhf_fast.orpo_loss(*tensors, **args)
