"""ppo_loss's constant weights of the policy term: verl's rollout correction (rollout_is /
rollout_rs, bypass_mode; truncated and masked IS) and TRL's entropy and off-policy masks,
with TRL's KL correction: by hand, against the peers' code rewritten, and the kernels
against the reference."""

import math

import pytest
import torch
from test_ppo_loss import FULL, compare, random_batch

import rlhf_fast
from helpers import rel_err
from rlhf_fast import reference
from rlhf_fast.options import PPO_OPTIONS
from rlhf_fast.types import AGG_MODES, POLICY_LOSSES, ROLLOUT_RS_MODES

F64 = torch.float64
CORRECTIONS = [
    dict(rollout_is="token"),
    dict(rollout_is="sequence", rollout_is_threshold=4.0),
    dict(rollout_is="token", rollout_is_batch_normalize=True, rollout_rs="token_k1",
         rollout_rs_threshold="0.75_1.5"),
    dict(rollout_is="sequence", rollout_is_batch_normalize=True,
         rollout_rs="seq_mean_k3,seq_max_k2", rollout_rs_threshold="0.0625,0.25"),
    dict(rollout_rs="token_k2,seq_sum_k1", rollout_rs_threshold="0.125,2.0"),
    {},  # rollout_logp alone: its statistics
]


def rollout_batch(**kwargs):
    batch = random_batch(**kwargs)
    noise = torch.randn(batch["logp"].shape, dtype=F64).to(batch["logp"].dtype)
    batch["rollout_logp"] = batch["old_logp"] + 0.3 * noise
    return batch


# ----------------------------------------------------------------- by hand


def test_hand_case_weights_and_rejection():
    # x = policy - rollout = (ln 3, ln 0.5): token weights (3 -> 2 truncated, 0.5); their
    # mean 1.25 normalises them; one sequence weight exp(ln 1.5) = 1.5
    mask = torch.ones(1, 2, dtype=torch.bool)
    policy = torch.tensor([[math.log(0.3), math.log(0.1)]], dtype=F64)
    rollout = torch.tensor([[math.log(0.1), math.log(0.2)]], dtype=F64)

    def correct(**opts):
        return reference.rollout_correction(policy, rollout, mask, PPO_OPTIONS.fill(opts))

    w, kept, stats = correct(rollout_is="token")
    assert w[0].tolist() == pytest.approx([2.0, 0.5]) and kept.all()
    assert stats["rollout_is_mean"].item() == pytest.approx(1.75)  # before truncation
    assert stats["rollout_is_max"].item() == pytest.approx(3.0)
    assert stats["rollout_kl"].item() == pytest.approx(-(math.log(3) + math.log(0.5)) / 2)
    assert stats["rollout_k3_kl"].item() == pytest.approx(
        (3 - math.log(3) - 1 + 0.5 - math.log(0.5) - 1) / 2)
    w, _, _ = correct(rollout_is="token", rollout_is_batch_normalize=True)
    assert w[0].tolist() == pytest.approx([2 / 1.25, 0.5 / 1.25])
    w, _, _ = correct(rollout_is="sequence")
    assert w[0].tolist() == pytest.approx([1.5, 1.5])
    # token_k1 bounds pi_rollout / pi_old = (1/3, 2) to [0.7, 1.4]: both rejected;
    # [0.25, 2.5] keeps both; token_k2 at 0.5 drops ln 3 (0.60) and keeps ln 0.5 (0.24)
    for spec, modes, expected in (("0.7_1.4", "token_k1", [False, False]),
                                  ("0.25_2.5", "token_k1", [True, True]),
                                  ("0.5", "token_k2", [False, True])):
        _, kept, stats = correct(rollout_rs=modes, rollout_rs_threshold=spec)
        assert kept.tolist() == [expected]
        assert stats["rollout_rs_masked_fraction"].item() == expected.count(False) / 2
    _, kept, _ = correct(rollout_rs="seq_max_k2", rollout_rs_threshold="0.5")  # the row
    assert kept.tolist() == [[False, False]]


def test_hand_case_masked_importance_sampling():
    """A "lower_upper" threshold zeroes the weights outside [lower, upper] (IcePop): the
    tokens stay in the mask and in the aggregation's counts."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    policy = torch.tensor([[math.log(0.3), math.log(0.1)]], dtype=F64)
    rollout = torch.tensor([[math.log(0.1), math.log(0.2)]], dtype=F64)  # ratios 3, 0.5

    def correct(**opts):
        return reference.rollout_correction(policy, rollout, mask, PPO_OPTIONS.fill(opts))

    w, kept, stats = correct(rollout_is="token", rollout_is_threshold="0.4_2.5")
    assert w[0].tolist() == pytest.approx([0.0, 0.5]) and kept.all()
    assert stats["rollout_is_masked_fraction"].item() == 0.5
    assert stats["rollout_is_mean"].item() == pytest.approx(1.75)  # before masking
    assert stats["rollout_is_max"].item() == pytest.approx(3.0)
    # the bounds themselves are inside, as TRL's strict comparisons have them
    w, _, stats = correct(rollout_is="token", rollout_is_threshold="0.5_3.0")
    assert w[0].tolist() == pytest.approx([3.0, 0.5])
    assert stats["rollout_is_masked_fraction"].item() == 0.0
    w, _, _ = correct(rollout_is="token", rollout_is_threshold="0.4_2.5",
                      rollout_is_batch_normalize=True)  # (0, 0.5) / their mean 0.25
    assert w[0].tolist() == pytest.approx([0.0, 2.0])
    # one sequence weight exp(ln 1.5) = 1.5: kept in [1, 2], the whole row zeroed in [2, 4]
    w, _, stats = correct(rollout_is="sequence", rollout_is_threshold="1_2")
    assert w[0].tolist() == pytest.approx([1.5, 1.5])
    w, _, stats = correct(rollout_is="sequence", rollout_is_threshold="2_4")
    assert w[0].tolist() == [0.0, 0.0] and stats["rollout_is_masked_fraction"].item() == 1.0
    # truncation masks nothing
    _, _, stats = correct(rollout_is="token", rollout_is_threshold=2.0)
    assert stats["rollout_is_masked_fraction"].item() == 0.0
    # gpg's token-mean: -(A_0 * 0 * logp_0 + A_1 * 0.5 * logp_1) / 2, the zeroed token
    # still counted
    logp = torch.tensor([[-1.0, -2.0]], dtype=F64, requires_grad=True)
    adv = torch.tensor([[1.5, -0.5]], dtype=F64)
    out = reference.ppo_loss(logp, policy, adv, mask, rollout_logp=rollout, policy_loss="gpg",
                             rollout_is="token", rollout_is_threshold="0.4_2.5")
    assert out.policy_loss.item() == pytest.approx(-(-0.5 * 0.5 * -2.0) / 2)
    assert out.rollout_is_masked_fraction.item() == 0.5
    (grad,) = torch.autograd.grad(out.policy_loss, logp)
    assert grad[0].tolist() == pytest.approx([0.0, 0.5 * 0.5 / 2])


def test_bypass_mode_is_reinforce_with_truncated_weights():
    """-A sg(min(exp(logp - old_logp), threshold)) logp, token-mean."""
    batch = random_batch()
    logp, old, adv, mask = (batch[k] for k in ("logp", "old_logp", "advantages", "mask"))
    logp = logp.nan_to_num().requires_grad_()
    out = reference.ppo_loss(logp, old, adv, mask, policy_loss="bypass_mode",
                             rollout_is="token", rollout_is_threshold=1.5)
    w = torch.exp(logp.detach() - old).clamp(max=1.5)
    pg = torch.where(mask, -adv.nan_to_num() * w.nan_to_num() * logp, 0.0)
    expected = pg.sum() / mask.sum()
    assert out.policy_loss.item() == pytest.approx(expected.item(), rel=1e-12)
    (g,) = torch.autograd.grad(out.policy_loss, logp)
    (g_expected,) = torch.autograd.grad(expected, logp)
    assert rel_err(g, g_expected) < 1e-12


# ----------------------------------------------------------------- verl's, rewritten


def _verl_masked_mean(x, m, dim=None):
    total = (x * m).sum() if dim is None else (x * m).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / (count + 1e-8)


def verl_rollout_correction(old, rollout, mask, rollout_is=None, rollout_is_threshold=2.0,
                            rollout_is_batch_normalize=False, rollout_rs=None,
                            rollout_rs_threshold=None):
    """compute_rollout_correction_and_rejection_mask's weights and mask, from its code."""
    m = mask.to(old.dtype)
    log_ratio = torch.where(mask, old - rollout, 0.0)
    weights = None
    if rollout_is is not None:
        if rollout_is == "token":
            weights = torch.exp(log_ratio.clamp(-20, 20))
        else:
            total = (log_ratio * m).sum(-1, keepdim=True)
            weights = torch.exp(total.clamp(-20, 20)).expand_as(log_ratio)
        weights = (weights * m).clamp(max=rollout_is_threshold)
        if rollout_is_batch_normalize:
            if rollout_is == "token":
                mean = _verl_masked_mean(weights, m)
            else:
                rows = (m.sum(-1) > 0).to(m.dtype)
                mean = (_verl_masked_mean(weights, m, -1) * rows).sum() / rows.sum().clamp_min(1e-8)
            if mean > 1e-8:
                weights = weights / mean
    keep_all = torch.ones_like(m)
    if rollout_rs is not None:
        modes = rollout_rs.split(",")
        specs = str(rollout_rs_threshold).split(",")
        specs = specs * len(modes) if len(specs) == 1 else specs
        safe = log_ratio.clamp(-20, 20)
        stats = {"k1": -safe, "k2": 0.5 * safe**2, "k3": torch.exp(safe) - 1.0 - safe}
        for mode, spec in zip(modes, specs):
            value = stats[mode[-2:]]
            if mode.startswith("seq_sum"):
                value = (value * m).sum(-1, keepdim=True)
            elif mode.startswith("seq_mean"):
                value = _verl_masked_mean(value, m, -1)[:, None]
            elif mode.startswith("seq_max"):
                top = value.masked_fill(~mask, -math.inf).max(-1, keepdim=True).values
                value = torch.where(top == -math.inf, 0.0, top)
            if mode.endswith("k1"):
                low, high = (float(x) for x in spec.split("_")) if "_" in spec else (
                    1 / float(spec), float(spec))
                keep = (value >= math.log(low)) & (value <= math.log(high))
            else:
                keep = value <= float(spec)
            keep_all = keep_all * keep.expand_as(m).to(m.dtype)
    return weights, (m * keep_all) > 0


@pytest.mark.parametrize("correction", CORRECTIONS + [
    dict(rollout_rs=mode, rollout_rs_threshold="0.5_2.0" if mode.endswith("k1") else "0.125")
    for mode in ROLLOUT_RS_MODES])
def test_rollout_correction_agrees_with_verl(correction):
    batch = rollout_batch()
    mask = batch["mask"]
    old, rollout = batch["old_logp"].nan_to_num(), batch["rollout_logp"].nan_to_num()
    ours, kept, _ = reference.rollout_correction(old, rollout, mask,
                                                 PPO_OPTIONS.fill(correction))
    theirs, their_kept = verl_rollout_correction(old, rollout, mask, **correction)
    assert torch.equal(kept, their_kept)
    if theirs is None:
        assert ours is None
    else:  # verl's masked means add 1e-8 to the counts
        assert rel_err(torch.where(mask, ours, 0.0), torch.where(mask, theirs, 0.0)) < 1e-8


def trl_importance_sampling_ratio(old, sampling, mask, mode, clip_min=None, clip_max=3.0):
    """GRPOTrainer._generate_and_score_completions' vllm_importance_sampling_ratio (its
    four vllm_importance_sampling_mode), from its code: [B, T] or [B, 1]."""
    diff = (old - sampling) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), value=0.0)


def trl_grpo_is_loss(logp, old, adv, mask, is_ratio, epsilon=0.2):
    """TRL's grpo loss (token level) with per_token_loss *= importance_sampling_ratio."""
    m = mask.to(logp.dtype)
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv) * is_ratio
    return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()


@pytest.mark.parametrize("mode, clip_min, clip_max", [
    ("token_mask", 0.8, 1.25), ("token_mask", None, 1.25), ("token_mask", 0.8, None),
    ("sequence_mask", 0.5, 2.0), ("token_truncate", None, 1.25),
    ("sequence_truncate", None, 2.0)])
def test_masked_and_truncated_is_agree_with_trl(mode, clip_min, clip_max):
    """Ours: rollout_is the level, rollout_is_threshold clip_max (truncate) or
    "clip_min_clip_max" (mask; 0 and inf for a missing bound), as PPOConfig maps TRL's
    names; the weights at the valid tokens and TRL's grpo loss with them."""
    batch = rollout_batch()
    batch["mask"][1, 0] = True  # TRL's grpo averages every row, empty ones as 0
    batch = {k: v.nan_to_num(-1.0) if v.is_floating_point() else v for k, v in batch.items()}
    mask, old, rollout = batch["mask"], batch["old_logp"], batch["rollout_logp"]
    threshold = clip_max if mode.endswith("truncate") else \
        f"{clip_min or 0.0}_{math.inf if clip_max is None else clip_max}"
    options = dict(rollout_is=mode.split("_")[0], rollout_is_threshold=threshold)
    ours, kept, stats = reference.rollout_correction(old, rollout, mask,
                                                     PPO_OPTIONS.check(options))
    theirs = trl_importance_sampling_ratio(old, rollout, mask, mode, clip_min, clip_max)
    assert kept.equal(mask)
    assert rel_err(ours[mask], theirs.expand_as(old)[mask]) < 1e-14
    zeroed = (theirs.expand_as(old) == 0) & mask
    assert stats["rollout_is_masked_fraction"].item() == pytest.approx(
        zeroed.sum().item() / mask.sum().item())
    if mode.endswith("mask"):
        assert 0 < zeroed.sum() < mask.sum()  # the case masks some tokens, not all
    logp = batch["logp"].clone().requires_grad_()
    out = reference.ppo_loss(logp, old, batch["advantages"], mask, rollout_logp=rollout,
                             agg="seq-mean-token-mean", **options)
    logp_trl = batch["logp"].clone().requires_grad_()
    expected = trl_grpo_is_loss(logp_trl, old, batch["advantages"], mask, theirs)
    assert out.policy_loss.item() == pytest.approx(expected.item(), rel=1e-12)
    (g_ours,) = torch.autograd.grad(out.policy_loss, logp)
    (g_theirs,) = torch.autograd.grad(expected, logp_trl)
    assert rel_err(g_ours, g_theirs) < 1e-12


# ----------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("correction", range(len(CORRECTIONS)))
@pytest.mark.parametrize("policy_loss", ["vanilla", "cispo", "gspo", "geo_mean"])
def test_matches_reference(policy_loss, correction):
    compare(rollout_batch(), dict(FULL, policy_loss=policy_loss, **CORRECTIONS[correction]),
            tol=1e-10)


@pytest.mark.parametrize("correction", range(len(CORRECTIONS) - 1))
def test_bypass_mode_matches_reference(correction):
    batch = random_batch()
    compare(batch, dict(FULL, policy_loss="bypass_mode", **CORRECTIONS[correction]),
            tol=1e-10)


MASKED_IS = [
    dict(rollout_is="token", rollout_is_threshold="0.8_1.25"),
    dict(rollout_is="sequence", rollout_is_threshold="0.5_2.0"),
    dict(rollout_is="token", rollout_is_threshold="0.8_1.25", rollout_is_batch_normalize=True,
         rollout_rs="seq_mean_k3", rollout_rs_threshold="0.0625"),
    dict(rollout_is="sequence", rollout_is_threshold="0.25_inf",
         rollout_is_batch_normalize=True),
]


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("policy_loss", ["vanilla", "gspo"])
def test_masked_is_matches_reference_on_every_aggregation(policy_loss, agg):
    batch = rollout_batch()
    options = dict(FULL, policy_loss=policy_loss, agg=agg, **MASKED_IS[0])
    masked = reference.ppo_loss(*[batch[k] for k in ("logp", "old_logp", "advantages", "mask")],
                                rollout_logp=batch["rollout_logp"], **MASKED_IS[0])
    assert 0 < masked.rollout_is_masked_fraction.item() < 1
    compare(batch, options, tol=1e-10)


@pytest.mark.parametrize("correction", range(len(MASKED_IS)))
@pytest.mark.parametrize("policy_loss", ["cispo", "geo_mean", "dro"])
def test_masked_is_matches_reference(policy_loss, correction):
    compare(rollout_batch(), dict(FULL, policy_loss=policy_loss, **MASKED_IS[correction]),
            tol=1e-10)


@pytest.mark.parametrize("correction", [0, 1])
def test_masked_is_in_bypass_mode_matches_reference(correction):
    compare(random_batch(), dict(FULL, policy_loss="bypass_mode", **MASKED_IS[correction]),
            tol=1e-10)


def test_matches_reference_in_float32():
    compare(rollout_batch(dtype=torch.float32), dict(FULL, **CORRECTIONS[3]), tol=1e-5)


@pytest.mark.parametrize("policy_loss", POLICY_LOSSES)
def test_every_policy_loss_takes_the_weights(policy_loss):
    """The IS weights scale the policy term of every loss (sapo and geo_mean included)."""
    batch = rollout_batch()
    opts = dict(policy_loss=policy_loss, rollout_is="token")
    if policy_loss == "bypass_mode":
        batch.pop("rollout_logp")
    plain = reference.ppo_loss(batch["logp"], batch["old_logp"], batch["advantages"],
                               batch["mask"], policy_loss=policy_loss)
    weighted = rlhf_fast.ppo_loss(batch["logp"], batch["old_logp"], batch["advantages"],
                                  batch["mask"], rollout_logp=batch.get("rollout_logp"), **opts)
    assert weighted.rollout_is_mean.item() > 0
    assert weighted.policy_loss.item() != pytest.approx(plain.policy_loss.item(), rel=1e-3)


def test_arguments_are_checked():
    batch = rollout_batch()
    args = [batch[k] for k in ("logp", "old_logp", "advantages", "mask")]
    with pytest.raises(ValueError, match=r"rollout_logp is required when rollout_is"):
        rlhf_fast.ppo_loss(*args, rollout_is="token")
    with pytest.raises(ValueError, match=r"rollout_logp must be None for policy_loss"):
        rlhf_fast.ppo_loss(*args, policy_loss="bypass_mode", rollout_logp=batch["rollout_logp"])
    with pytest.raises(ValueError, match=r"rollout_rs_threshold must be one threshold"):
        rlhf_fast.ppo_loss(*args, rollout_logp=batch["rollout_logp"], rollout_rs="token_k2",
                           rollout_rs_threshold="1_2")
    with pytest.raises(ValueError, match=r"rollout_rs must be None or a comma-separated"):
        rlhf_fast.PPOLoss(rollout_rs="token_k4")
    with pytest.raises(ValueError, match=r"rollout_logp must have logp's shape"):
        rlhf_fast.ppo_loss(*args, rollout_logp=batch["rollout_logp"][:, 1:])
    for bad in ("2_1", "0", "-1_2", "0.5_2_3", "a_b", "inf", True):
        with pytest.raises(ValueError, match=r"rollout_is_threshold must be a positive "
                                             r"number u \(truncated IS\) or \"lower_upper\""):
            rlhf_fast.ppo_loss(*args, rollout_logp=batch["rollout_logp"], rollout_is="token",
                               rollout_is_threshold=bad)
    with pytest.raises(ValueError, match=r"rollout_is_threshold must be .* got '1_1'"):
        rlhf_fast.PPOLoss(rollout_is_threshold="1_1")
    # a number comes back as its text, a spec as given
    assert PPO_OPTIONS.check(dict(rollout_is_threshold=3)).rollout_is_threshold == "3.0"
    assert PPO_OPTIONS.check(dict(rollout_is_threshold="0_inf")).rollout_is_threshold == "0_inf"


# ----------------------------------------------------------------- TRL's masks and KL


def trl_grpo_loss(logp, old, adv, mask, ref, entropy, top_entropy_quantile=1.0,
                  off_policy_mask_threshold=None, use_bias_correction_kl=False, beta=0.0,
                  epsilon=0.2):
    """TRL's GRPOTrainer._compute_loss (loss_type grpo, token level), from its code."""
    m = mask.to(logp.dtype)
    coef_1 = torch.exp(logp - old)
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    if use_bias_correction_kl:
        per_token_kl = per_token_kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if off_policy_mask_threshold is not None:
        kl_div = old - logp.detach()
        avg = (kl_div * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
        per_token_loss = per_token_loss * ((adv >= 0) | (avg <= off_policy_mask_threshold))
    if top_entropy_quantile < 1.0:
        threshold = torch.quantile(entropy[mask], 1 - top_entropy_quantile)
        per_token_loss = per_token_loss * ((entropy * m >= threshold) & mask)
    per_token_loss = per_token_loss + beta * per_token_kl
    return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()


@pytest.mark.parametrize("options", [
    dict(top_entropy_quantile=0.25), dict(off_policy_mask_threshold=0.02),
    dict(use_bias_correction_kl=True, beta=0.125),
    dict(top_entropy_quantile=0.5, off_policy_mask_threshold=0.0, use_bias_correction_kl=True,
         beta=0.25),
])
def test_agrees_with_trl(options):
    batch = random_batch()
    batch["mask"][1, 0] = True  # TRL's grpo averages every row, empty ones as 0
    batch = {k: v.nan_to_num(-1.0) if v.is_floating_point() else v for k, v in batch.items()}
    args = [batch[k] for k in ("logp", "old_logp", "advantages", "mask")]
    ours_options = dict(options)
    beta = ours_options.pop("beta", 0.0)
    logp = args[0].clone().requires_grad_()
    ours = reference.ppo_loss(logp, *args[1:], ref_logp=batch["ref_logp"],
                              entropy=batch["entropy"], kl_coef=beta, kl_estimator="k3",
                              agg="seq-mean-token-mean", **ours_options)
    logp_trl = args[0].clone().requires_grad_()
    theirs = trl_grpo_loss(logp_trl, *args[1:], batch["ref_logp"], batch["entropy"], **options)
    assert (ours.policy_loss + beta * ours.kl).item() == pytest.approx(theirs.item(), rel=1e-12)
    (g_ours,) = torch.autograd.grad(ours.policy_loss + beta * ours.kl, logp)
    (g_theirs,) = torch.autograd.grad(theirs, logp_trl)
    assert rel_err(g_ours, g_theirs) < 1e-12


def test_trl_masks_drop_the_tokens_they_name():
    batch = random_batch()
    args = [batch[k] for k in ("logp", "old_logp", "advantages", "mask")]
    weights, _, _ = reference.policy_weights(
        *[a.nan_to_num() for a in args[:3]], batch["entropy"].nan_to_num(), None,
        batch["mask"], PPO_OPTIONS.fill(dict(top_entropy_quantile=0.25)))
    kept = (weights > 0) & batch["mask"]
    assert kept.sum() == pytest.approx(0.25 * batch["mask"].sum(), abs=1.5)
    assert batch["entropy"][kept].min() >= batch["entropy"][batch["mask"] & ~kept].max()


@pytest.mark.parametrize("options", [
    dict(use_bias_correction_kl=True), dict(use_bias_correction_kl=True, kl_estimator="k3+"),
    dict(top_entropy_quantile=0.5), dict(off_policy_mask_threshold=0.03),
    dict(top_entropy_quantile=0.75, off_policy_mask_threshold=0.0, policy_loss="gspo",
         rollout_is="token"),
])
def test_trl_options_match_reference(options):
    compare(rollout_batch(), dict(FULL, **options), tol=1e-10)


def test_top_entropy_quantile_needs_entropy():
    batch = random_batch()
    with pytest.raises(ValueError, match="entropy is required when top_entropy_quantile < 1"):
        rlhf_fast.ppo_loss(*[batch[k] for k in ("logp", "old_logp", "advantages", "mask")],
                           top_entropy_quantile=0.5)
