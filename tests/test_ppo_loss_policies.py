"""ppo_loss's `policy_loss` family: each loss by hand, against its peers' formulas
(verl's `compute_policy_loss_<name>`, TRL's GRPOTrainer), and the kernels against the
float64 reference on every aggregation."""

import math

import pytest
import torch
from test_ppo_loss import FULL, compare, random_batch

import rlhf_fast
from helpers import rel_err
from rlhf_fast import reference
from rlhf_fast.benchmarks import traffic
from rlhf_fast.types import AGG_MODES, POLICY_LOSSES, SEQUENCE_POLICY_LOSSES

F64 = torch.float64
# Settings under which each loss's bounds hold on some tokens of `policy_batch` and not
# on others (asserted in test_every_bound_is_exercised), exact in fp32.
SETTINGS = {
    "vanilla": dict(dual_clip=1.5),
    "cispo": {},
    "sapo": dict(tau_pos=1.5, tau_neg=0.75),
    "gpg": {},
    "dppo_tv": dict(clip_eps=0.0625, clip_eps_high=0.125, clip_ratio_c=1.5),
    "dppo_kl": dict(clip_eps=0.015625, clip_eps_high=0.03125, clip_ratio_c=1.5),
    "gspo": {},
    "gspo_token": {},
    "geo_mean": {},
    "bypass_mode": {},  # its weights: tests/test_ppo_loss_rollout.py
    # no token in clip_cov's covariance range: its random draws (test_covariance_*) apart
    "clip_cov": dict(clip_cov_lb=1e30, clip_cov_ub=2e30),
    "kl_cov": dict(kl_cov_ratio=0.0625, ppo_kl_coef=0.5),
    "dro": dict(dro_beta=0.25),
}
# The losses whose gradient is the derivative of their value (the others stop a ratio's
# gradient: cispo, dppo_*, gspo_token), which gradcheck can see.
TRUE_GRADIENT = ("vanilla", "sapo", "gpg", "gspo", "geo_mean", "dro")


def options_of(policy_loss, **more):
    return dict(FULL, policy_loss=policy_loss, **SETTINGS[policy_loss], **more)


def policy_batch(B=6, T=37, dtype=F64, nan=True):
    """`random_batch` with a log-ratio offset per row (from -0.75 to 0.75), so that the
    sequence ratios of gspo and geo_mean leave the clip range on some rows, and
    probabilities below 1 (dppo reads exp(old_logp))."""
    batch = random_batch(B, T, F64)
    shift = torch.linspace(-0.75, 0.75, B, dtype=F64)[:, None]
    batch["old_logp"] = torch.clamp(batch["old_logp"] - shift, max=-0.01)
    if not nan:
        batch = {k: v.nan_to_num(-1.0) if v.is_floating_point() else v for k, v in batch.items()}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def loss_and_grad(fn, logp, old_logp, advantages, mask, **options):
    logp = logp.detach().clone().requires_grad_()
    out = fn(logp, old_logp, advantages, mask, **options)
    (grad,) = torch.autograd.grad(out.policy_loss, logp)
    return out, grad


def column(*values):
    return torch.tensor([values], dtype=F64)


# ----------------------------------------------------------------- hand-computed cases

# Two tokens: ratios 2 and 0.5 (logp log 0.5 and log 0.2 against log 0.25 and log 0.4).
LOGP, OLD = column(math.log(0.5), math.log(0.2)), column(math.log(0.25), math.log(0.4))
BOTH = torch.ones(1, 2, dtype=torch.bool)


def test_cispo_hand_case():
    # clip(r) = (1.2, 0.8): pg = -w A logp; the gradient -w A, the ratio's stopped
    out, grad = loss_and_grad(reference.ppo_loss, LOGP, OLD, column(1.0, -2.0), BOTH,
                              policy_loss="cispo")
    assert out.policy_loss.item() == pytest.approx(
        (-1.2 * math.log(0.5) + 0.8 * 2 * math.log(0.2)) / 2)
    assert grad[0].tolist() == pytest.approx([-0.6, 0.8])
    assert (out.clipfrac_high.item(), out.clipfrac_low.item()) == (0.5, 0.5)


def test_sapo_hand_case():
    # token 0: r = 1, A = 2, tau_pos 1: pg = -2 sigmoid(0) 4 = -4, d = -4 A s (1 - s) r = -2;
    # token 1: r = 2, A = -1, tau_neg 1.05: pg = sigmoid(1.05) 4 / 1.05, d = 8 s (1 - s)
    logp = column(math.log(0.5), math.log(0.5))
    out, grad = loss_and_grad(reference.ppo_loss, logp, column(math.log(0.5), math.log(0.25)),
                              column(2.0, -1.0), BOTH, policy_loss="sapo")
    s = 1 / (1 + math.exp(-1.05))
    assert out.policy_loss.item() == pytest.approx((-4 + s * 4 / 1.05) / 2)
    assert grad[0].tolist() == pytest.approx([-1.0, 4 * s * (1 - s)])
    assert out.clipfrac.item() == 0.0


def test_gpg_hand_case():
    out, grad = loss_and_grad(reference.ppo_loss, LOGP, OLD, column(1.0, -2.0), BOTH,
                              policy_loss="gpg")
    assert out.policy_loss.item() == pytest.approx((-math.log(0.5) + 2 * math.log(0.2)) / 2)
    assert grad[0].tolist() == pytest.approx([-0.5, 1.0])


def test_dppo_tv_hand_case():
    # p 0.5 from 0.25 twice: the rise 0.25 > 0.2 drops the A > 0 token; the A < 0 one is
    # kept, its ratio 2 capped at 1.5: pg = 1.5 log 0.5, d = 1.5
    logp = column(math.log(0.5), math.log(0.5))
    old = column(math.log(0.25), math.log(0.25))
    out, grad = loss_and_grad(reference.ppo_loss, logp, old, column(1.0, -1.0), BOTH,
                              policy_loss="dppo_tv", clip_ratio_c=1.5)
    assert out.policy_loss.item() == pytest.approx(1.5 * math.log(0.5) / 2)
    assert grad[0].tolist() == pytest.approx([0.0, 0.75])
    assert (out.clipfrac_high.item(), out.clipfrac_low.item()) == (0.5, 0.0)
    assert out.dual_clipfrac.item() == 0.5


def test_dppo_kl_hand_case():
    # binary KL of p 0.5 against p_old 0.25: 0.25 log(0.25 / 0.5) + 0.75 log(0.75 / 0.5)
    binary_kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # 0.1308
    args = (column(math.log(0.5)), column(math.log(0.25)), column(1.0), torch.ones(1, 1) > 0)
    for bound, dropped in ((0.125, True), (0.25, False)):
        assert (binary_kl > bound) == dropped
        out, grad = loss_and_grad(reference.ppo_loss, *args, policy_loss="dppo_kl",
                                  clip_eps_high=bound)
        assert out.clipfrac_high.item() == float(dropped)
        assert grad.item() == pytest.approx(0.0 if dropped else -2.0)


def test_dro_hand_case_and_twinkles_formula():
    # -(A logp - beta (log r)^2 / 2) at ratios 2 and 0.5, beta 0.1: d = -A + beta log r
    out, grad = loss_and_grad(reference.ppo_loss, LOGP, OLD, column(1.0, -2.0), BOTH,
                              policy_loss="dro", dro_beta=0.1)
    lr = [math.log(2.0), math.log(0.5)]
    pg = [-(1.0 * math.log(0.5) - 0.05 * lr[0] ** 2),
          -(-2.0 * math.log(0.2) - 0.05 * lr[1] ** 2)]
    assert out.policy_loss.item() == pytest.approx(sum(pg) / 2)
    assert grad[0].tolist() == pytest.approx([(-1 + 0.1 * lr[0]) / 2, (2 + 0.1 * lr[1]) / 2])


def test_gspo_and_gspo_token_hand_case():
    # log-ratios ln 2 and 0: s = exp(ln 2 / 2) = sqrt 2, one ratio for the row; with
    # A = (-1, -3) neither token is clipped: pg = (sqrt 2, 3 sqrt 2), token-mean 2 sqrt 2
    logp, old = column(math.log(0.5), math.log(0.3)), column(math.log(0.25), math.log(0.3))
    adv = column(-1.0, -3.0)
    root2 = math.sqrt(2)
    seq, seq_grad = loss_and_grad(reference.ppo_loss, logp, old, adv, BOTH, policy_loss="gspo")
    tok, tok_grad = loss_and_grad(reference.ppo_loss, logp, old, adv, BOTH,
                                  policy_loss="gspo_token")
    assert seq.policy_loss.item() == pytest.approx(2 * root2)
    assert tok.policy_loss.item() == pytest.approx(2 * root2)
    # gspo: d/d logp_t = (1/2) sum_t' (1/2) (-A_t') s = sqrt 2; gspo_token: (1/2) (-A_t) s
    assert seq_grad[0].tolist() == pytest.approx([root2, root2])
    assert tok_grad[0].tolist() == pytest.approx([root2 / 2, 3 * root2 / 2])
    # A > 0: s = 1.41 > 1.2 clips both tokens, and no gradient passes
    out, grad = loss_and_grad(reference.ppo_loss, logp, old, column(1.0, 1.0), BOTH,
                              policy_loss="gspo")
    assert out.policy_loss.item() == pytest.approx(-1.2)
    assert out.clipfrac_high.item() == 1.0 and grad.abs().max().item() == 0.0


def test_geo_mean_hand_case():
    # A > 0: the log-ratios ln 2 and ln 0.5 are clipped above at 0.2: m = (0.2 + ln 0.5) / 2;
    # pg = -exp(m) at both tokens; d/d logp = (0, -exp(m) / 2)
    out, grad = loss_and_grad(reference.ppo_loss, column(math.log(0.5), math.log(0.2)),
                              column(math.log(0.25), math.log(0.4)), column(1.0, 1.0), BOTH,
                              policy_loss="geo_mean")
    g = math.exp((0.2 + math.log(0.5)) / 2)
    assert out.policy_loss.item() == pytest.approx(-g)
    assert grad[0].tolist() == pytest.approx([0.0, -g / 2])
    assert (out.clipfrac_high.item(), out.clipfrac_low.item()) == (0.5, 0.0)


def test_gspo_equals_gspo_token_when_the_advantage_is_constant_along_each_row():
    batch = policy_batch(nan=False)
    args = [batch[k] for k in ("logp", "old_logp", "advantages", "mask")]
    args[2] = args[2][:, :1].expand_as(args[2]).contiguous()
    seq, seq_grad = loss_and_grad(reference.ppo_loss, *args, policy_loss="gspo")
    tok, tok_grad = loss_and_grad(reference.ppo_loss, *args, policy_loss="gspo_token")
    assert seq.policy_loss.item() == pytest.approx(tok.policy_loss.item(), rel=1e-14)
    assert rel_err(seq_grad, tok_grad) < 1e-13
    args[2] = batch["advantages"]  # varying along the rows: the gradients part
    _, seq_grad = loss_and_grad(reference.ppo_loss, *args, policy_loss="gspo")
    _, tok_grad = loss_and_grad(reference.ppo_loss, *args, policy_loss="gspo_token")
    assert rel_err(seq_grad, tok_grad) > 0.1


# ----------------------------------------------------------------- the peers' formulas
# Rewritten from the peers' code (verl verl/trainer/ppo/core_algos.py, TRL
# trl/trainer/grpo_trainer.py `_compute_loss`), on finite inputs.


def _verl_agg(x, mask, mode):
    m = mask.to(x.dtype)
    if mode == "token-mean":
        return (x * m).sum() / m.sum()
    seq = (x * m).sum(-1) / (m.sum(-1) + 1e-8)
    nonempty = (m.sum(-1) > 0).to(x.dtype)
    return (seq * nonempty).sum() / nonempty.sum()


def _clip_pair(ratio, adv, low, high):
    return -adv * ratio, -adv * torch.clamp(ratio, 1 - low, 1 + high)


def verl_policy_loss(name, logp, old, adv, mask, low=0.2, high=0.28, c=3.0, tau_pos=1.0,
                     tau_neg=1.05, agg="token-mean"):
    log_ratio = torch.clamp(logp - old, -20, 20)
    ratio = torch.exp(log_ratio)
    if name == "vanilla":  # verl always dual-clips, at clip_ratio_c (3 by default)
        pg1, pg2 = _clip_pair(ratio, adv, low, high)
        clip1 = torch.maximum(pg1, pg2)
        pg = torch.where(adv < 0, torch.min(-adv * c, clip1), clip1)
    elif name == "cispo":
        pg = -torch.clamp(ratio, 1 - low, 1 + high).detach() * adv * logp
    elif name == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), tau_neg)
        pg = -torch.sigmoid(tau * (ratio - 1)) * (4.0 / tau) * adv
        agg = "seq-mean-token-mean"
    elif name == "gpg":
        pg = -logp * adv
    elif name in ("dppo_tv", "dppo_kl"):
        capped = torch.clamp(ratio, max=c).detach()
        prob, old_prob = torch.exp(logp), torch.exp(old)
        if name == "dppo_tv":
            keep_pos, keep_neg = prob - old_prob <= high, prob - old_prob >= -low
        else:
            binary_kl = old_prob * (old - logp) + (1 - old_prob) * torch.log(
                (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            keep_pos = (binary_kl <= high) | (prob <= old_prob)
            keep_neg = (binary_kl <= low) | (prob >= old_prob)
        keep = torch.where(adv > 0, keep_pos, keep_neg).detach().to(logp.dtype)
        pg = -adv * capped * logp * keep
    elif name == "gspo":  # the sequence_token form
        m = mask.to(logp.dtype)
        seq = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
        log_s = torch.clamp(logp - logp.detach() + seq.detach()[:, None], max=10.0)
        pg = torch.maximum(*_clip_pair(torch.exp(log_s), adv, low, high))
        agg = "seq-mean-token-mean"
    elif name == "geo_mean":
        m = mask.to(logp.dtype)
        sign = torch.sign(adv)
        log_ratio = logp - old
        clamped = torch.clamp(log_ratio, -low, high)
        kept = sign * torch.min(sign * log_ratio, sign * clamped)
        count = m.sum(-1)
        ratio = torch.exp((kept * m).sum(-1) / (count + 1e-8))
        return torch.mean(-(adv * m).sum(-1) / (count + 1e-8) * ratio)
    return _verl_agg(pg, mask, agg)


# ours -> (the verl loss it is, our options)
AS_VERL = {
    "vanilla": ("vanilla", dict(dual_clip=3.0)),
    "cispo": ("cispo", {}),
    "sapo": ("sapo", dict(agg="seq-mean-token-mean")),
    "gpg": ("gpg", {}),
    "dppo_tv": ("dppo_tv", dict(clip_ratio_c=3.0)),
    "dppo_kl": ("dppo_kl", dict(clip_ratio_c=3.0)),
    "gspo_token": ("gspo", dict(agg="seq-mean-token-mean")),  # verl's "gspo"
    "geo_mean": ("geo_mean", dict(agg="seq-mean-token-mean")),
}


@pytest.mark.parametrize("ours", sorted(AS_VERL))
def test_agrees_with_verl(ours):
    """In value and gradient, on a batch without empty rows (verl's geo_mean counts them)."""
    batch = policy_batch(nan=False)
    batch["mask"][1, 0] = True
    low, high = (0.0625, 0.125) if ours.startswith("dppo") else (0.2, 0.28)
    args = [batch[k] for k in ("logp", "old_logp", "advantages", "mask")]
    name, options = AS_VERL[ours]
    out, grad = loss_and_grad(reference.ppo_loss, *args, policy_loss=ours, clip_eps=low,
                              clip_eps_high=high, **options)
    logp = args[0].clone().requires_grad_()
    theirs = verl_policy_loss(name, logp, *args[1:], low=low, high=high)
    (their_grad,) = torch.autograd.grad(theirs, logp)
    # verl divides row sums by count + 1e-8: each row's mean off by a relative 1e-8
    assert out.policy_loss.item() == pytest.approx(theirs.item(), rel=1e-7, abs=1e-8)
    assert rel_err(grad, their_grad) < 1e-7


def trl_loss(name, logp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28):
    """TRL's GRPO per-token loss (loss_type cispo, sapo, or grpo with
    importance_sampling_level="sequence"), each row's mean, averaged (its "grpo")."""
    m = mask.to(logp.dtype)
    log_ratio = logp - old
    if name == "gspo":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0))[:, None]
    coef_1 = torch.exp(log_ratio)
    if name == "cispo":
        per_token = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * logp
    elif name == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, 1.0), 1.05)
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()


@pytest.mark.parametrize("name", ["gspo", "sapo", "cispo"])
def test_agrees_with_trl(name):
    batch = policy_batch(nan=False)
    batch["mask"][1, 0] = True
    args = [batch[k] for k in ("logp", "old_logp", "advantages", "mask")]
    # TRL's cispo caps the ratio at epsilon_high itself, without a lower bound: ours with
    # clip_eps_high = epsilon_high - 1 and clip_eps near 1 (every ratio here is > 0.01).
    options = dict(clip_eps=0.99, clip_eps_high=4.0) if name == "cispo" else dict(
        clip_eps_high=0.28)
    out, grad = loss_and_grad(reference.ppo_loss, *args, policy_loss=name,
                              agg="seq-mean-token-mean", **options)
    logp = args[0].clone().requires_grad_()
    theirs = trl_loss(name, logp, *args[1:], epsilon_high=5.0 if name == "cispo" else 0.28)
    (their_grad,) = torch.autograd.grad(theirs, logp)
    assert out.policy_loss.item() == pytest.approx(theirs.item(), rel=1e-12)
    assert rel_err(grad, their_grad) < 1e-12


def test_cispo_clips_both_sides_as_the_paper_where_trl_has_no_lower_bound():
    """The gradients differ exactly at the valid tokens below 1 - clip_eps (the paper's
    lower clip, which TRL lacks), one of them forced: there the paper weighs the token by
    0.8, TRL by its ratio."""
    batch = policy_batch(nan=False)
    batch["mask"][1, 0] = True  # no empty row: TRL's mean counts it, seq-mean-token-mean not
    batch["mask"][0, 0], batch["advantages"][0, 0] = True, 1.0
    batch["logp"][0, 0] = batch["old_logp"][0, 0] + math.log(0.5)
    args = [batch[k] for k in ("logp", "old_logp", "advantages", "mask")]
    ours, grad = loss_and_grad(reference.ppo_loss, *args, policy_loss="cispo",
                               clip_eps=0.2, clip_eps_high=4.0, agg="seq-mean-token-mean")
    logp = args[0].clone().requires_grad_()
    (their_grad,) = torch.autograd.grad(trl_loss("cispo", logp, *args[1:], epsilon_high=5.0),
                                        logp)
    ratio = (batch["logp"] - batch["old_logp"]).exp()
    clipped_low = batch["mask"] & (ratio < 0.8) & (batch["advantages"] != 0)
    assert ours.clipfrac_low.item() > 0 and clipped_low[0, 0]
    torch.testing.assert_close(grad[~clipped_low], their_grad[~clipped_low], rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(grad[clipped_low] / their_grad[clipped_low],
                               0.8 / ratio[clipped_low], rtol=1e-12, atol=0)


# ----------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("policy_loss", POLICY_LOSSES)
def test_every_bound_is_exercised(policy_loss):
    """The batches below clip some tokens and not others (sapo, gpg, bypass_mode, kl_cov
    and dro clip nothing)."""
    batch = policy_batch()
    out = reference.ppo_loss(batch["logp"], batch["old_logp"], batch["advantages"],
                             batch["mask"], **options_of(policy_loss))
    if policy_loss in ("sapo", "gpg", "bypass_mode", "kl_cov", "dro"):
        assert out.clipfrac.item() == 0
        return
    assert 0 < out.clipfrac_high.item() < 1 and 0 < out.clipfrac_low.item() < 1
    if policy_loss in ("vanilla", "dppo_tv", "dppo_kl"):
        assert 0 < out.dual_clipfrac.item() < 1


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("policy_loss", POLICY_LOSSES)
def test_matches_reference(policy_loss, agg):
    compare(policy_batch(), options_of(policy_loss, agg=agg), tol=1e-10)


@pytest.mark.parametrize("policy_loss", POLICY_LOSSES)
def test_matches_reference_in_float32(policy_loss):
    compare(policy_batch(dtype=torch.float32), options_of(policy_loss), tol=1e-5)


@pytest.mark.parametrize("policy_loss", SEQUENCE_POLICY_LOSSES)
def test_sequence_losses_on_rows_of_several_tiles(policy_loss):
    """Rows of 2100 tokens span three tiles: the row mean and the row's d pg / d m are
    sums over tiles."""
    compare(policy_batch(B=3, T=2100), options_of(policy_loss, agg="seq-mean-token-mean"),
            tol=1e-10)


@pytest.mark.parametrize("policy_loss", POLICY_LOSSES)
def test_launches_are_the_documented_ones(policy_loss):
    """ppo_loss's docstring: forward 2 launches (tiles, their reduction), backward 1; the
    sequence losses (and only they: not kl_cov nor dro) add a first pass for their row
    means. The torch ops before the kernels (rollout weights, kl_cov's coefficients) are
    not Triton launches."""
    batch = policy_batch(B=3, T=9, nan=False)
    logp = batch["logp"].clone().requires_grad_()
    with traffic.counting() as forward:
        out = rlhf_fast.ppo_loss(logp, batch["old_logp"], batch["advantages"],
                                 batch["mask"], **SETTINGS[policy_loss],
                                 policy_loss=policy_loss)
    with traffic.counting() as backward:
        out.loss.backward()
    first = ["_ppo_sequence_kernel"] if policy_loss in SEQUENCE_POLICY_LOSSES else []
    assert forward.launches == first + ["_ppo_fwd_kernel", "_ppo_reduce_kernel"]
    assert backward.launches == ["_ppo_bwd_kernel"]


@pytest.mark.parametrize("policy_loss", TRUE_GRADIENT)
def test_gradcheck_float64(policy_loss):
    batch = policy_batch(B=3, T=5, nan=False)
    args = [batch[k] for k in ("old_logp", "advantages", "mask")]

    def loss(logp):
        # off the clip boundaries (kinks): a clip range no ratio here reaches
        return rlhf_fast.ppo_loss(logp, *args, policy_loss=policy_loss, clip_eps=0.999,
                                  clip_eps_high=50.0, agg="seq-mean-token-mean").policy_loss

    logp = batch["logp"].clone().requires_grad_()
    assert torch.autograd.gradcheck(loss, (logp,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("policy_loss", SEQUENCE_POLICY_LOSSES)
def test_nan_in_a_sequence_reaches_its_row_only(monkeypatch, policy_loss):
    """Through the row's mean: every token of the row whose gradient goes through it (for
    geo_mean not those clipped out of it), on both backends alike."""
    batch = policy_batch(nan=False)
    batch["old_logp"][0, 3] = float("nan")
    args = [batch[k] for k in ("logp", "old_logp", "advantages", "mask")]
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
        out, grads[backend] = loss_and_grad(rlhf_fast.ppo_loss, *args, policy_loss=policy_loss)
        assert out.policy_loss.isnan()
        assert torch.isfinite(grads[backend][1:]).all()
    nan_at = grads["torch"][0].isnan()
    assert nan_at.sum() > 3 and torch.equal(nan_at, grads["triton"][0].isnan())
    if policy_loss != "geo_mean":
        assert nan_at.all()
    assert rel_err(grads["triton"][1:], grads["torch"][1:]) < 1e-12


def test_dual_clip_belongs_to_vanilla():
    batch = policy_batch()
    with pytest.raises(ValueError, match=r"dual_clip must be None for policy_loss 'gspo'"):
        rlhf_fast.ppo_loss(batch["logp"], batch["old_logp"], batch["advantages"],
                           batch["mask"], policy_loss="gspo", dual_clip=3.0)
    with pytest.raises(ValueError, match=r"policy_loss must be one of"):
        rlhf_fast.PPOLoss(policy_loss="grpo")


# ----------------------------------------------------------------- clip_cov, kl_cov


def _cov(logp, adv, mask):
    valid_adv, valid_logp = adv[mask], logp[mask]
    return (adv - valid_adv.mean()) * (logp - valid_logp.mean())


def verl_clip_cov(logp, old, adv, mask, low, high, ratio=0.0002, lb=1.0, ub=5.0):
    """verl's compute_policy_loss_clip_cov, from its code (token-mean)."""
    m = mask.to(logp.dtype)
    r = torch.exp(logp - old)
    pg1, pg2 = -adv * r, -adv * torch.clamp(r, 1 - low, 1 + high)
    clip_by_origin = (pg2 > pg1) & mask
    cov = _cov(logp.detach(), adv, mask)
    cov[~mask] = -torch.inf
    cov[clip_by_origin] = -torch.inf
    clip_num = max(int(ratio * m.sum().item()), 1)
    idx = torch.nonzero((cov < ub) & (cov > lb) & mask)
    if len(idx) > 0:
        idx = idx[torch.randperm(len(idx))[:min(clip_num, len(idx))]]
    corr = torch.ones_like(adv)
    corr[idx[:, 0], idx[:, 1]] = 0
    return (torch.maximum(pg1, pg2) * corr * m).sum() / m.sum()


def verl_kl_cov(logp, old, adv, mask, ratio=0.0002, coef=1.0):
    """verl's compute_policy_loss_kl_cov, from its code (token-mean)."""
    m = mask.to(logp.dtype)
    log_ratio = logp - old
    pg = -adv * torch.exp(log_ratio)
    pg_kl = pg + coef * log_ratio.abs()
    flat_idx = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    cov = _cov(logp.detach(), adv, mask)[mask]
    top = flat_idx[torch.topk(cov, max(1, int(len(cov) * ratio))).indices]
    pg = pg.clone()
    rows, cols = top // adv.shape[1], top % adv.shape[1]
    pg[rows, cols] = pg_kl[rows, cols]
    return (pg * m).sum() / m.sum()


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_covariance_losses_agree_with_verl(name):
    """Ratios large enough that a tenth of the tokens is selected (verl's default share
    of 0.0002 selects one token here). clip_cov draws its tokens from its own random
    stream (random keys, no host sync, where verl takes a randperm of the candidates'
    indices): a share of 1 draws every candidate, which leaves nothing to chance; the
    draw itself is `test_clip_cov_draws_its_share_of_the_candidates`'."""
    batch = random_batch()
    batch = {k: v.nan_to_num(-1.0) if v.is_floating_point() else v for k, v in batch.items()}
    args = [batch[k] for k in ("logp", "old_logp", "advantages", "mask")]
    settings = dict(clip_cov_ratio=1.0, clip_cov_lb=-1.0, clip_cov_ub=5.0) \
        if name == "clip_cov" else dict(kl_cov_ratio=0.1, ppo_kl_coef=0.5)
    torch.manual_seed(7)
    ours, grad = loss_and_grad(reference.ppo_loss, *args, policy_loss=name, clip_eps_high=0.28,
                               **settings)
    torch.manual_seed(7)
    logp = args[0].clone().requires_grad_()
    if name == "clip_cov":
        theirs = verl_clip_cov(logp, *args[1:], 0.2, 0.28, 1.0, -1.0, 5.0)
    else:
        theirs = verl_kl_cov(logp, *args[1:], 0.1, 0.5)
    (their_grad,) = torch.autograd.grad(theirs, logp)
    assert ours.policy_loss.item() == pytest.approx(theirs.item(), rel=1e-12)
    assert rel_err(grad, their_grad) < 1e-12
    # the selection changed something: the plain loss differs
    plain, _ = loss_and_grad(reference.ppo_loss, *args, clip_eps_high=0.28,
                             policy_loss="vanilla" if name == "clip_cov" else "gpg")
    assert plain.policy_loss.item() != pytest.approx(ours.policy_loss.item(), rel=1e-6)


def test_clip_cov_draws_its_share_of_the_candidates():
    """max(1, floor(ratio n)) tokens dropped, each an unclipped candidate (covariance in
    (lb, ub)); another seed, another draw (an identical subset of 9 or more among 80 or
    more candidates has a chance below 1e-11)."""
    from rlhf_fast.options import PPO_OPTIONS
    from rlhf_fast.reference.policy_masks import _clip_cov_kept, _covariance

    torch.manual_seed(0)
    B, T = 8, 50
    logp, old = -torch.rand(B, T, dtype=F64) * 3, -torch.rand(B, T, dtype=F64) * 3
    old = logp + (old - logp) * 0.01  # ratios near 1: few clipped tokens
    adv, mask = torch.randn(B, T, dtype=F64), torch.rand(B, T) < 0.9
    opt = PPO_OPTIONS.check(dict(policy_loss="clip_cov", clip_cov_ratio=0.03,
                                 clip_cov_lb=-100.0, clip_cov_ub=100.0))
    cov = _covariance(logp, adv, mask)
    candidates = mask & (cov > -100) & (cov < 100)
    count = max(int(0.03 * int(mask.sum())), 1)
    assert candidates.sum() > 80 and count >= 9
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        dropped = ~_clip_cov_kept(logp, old, adv, mask, opt)
        assert int(dropped.sum()) == count and not (dropped & ~candidates).any()
        draws.append(dropped)
    assert not torch.equal(*draws)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_covariance_losses_match_reference(name, agg):
    settings = dict(clip_cov_ratio=0.125, clip_cov_lb=-1.0) if name == "clip_cov" else dict(
        kl_cov_ratio=0.125, ppo_kl_coef=0.5)
    batch = policy_batch()
    for backend in ("triton", "torch"):  # the same draws of clip_cov on both
        torch.manual_seed(3)
        out, grad = loss_and_grad(rlhf_fast.ppo_loss if backend == "triton" else
                                  reference.ppo_loss,
                                  *[batch[k] for k in ("logp", "old_logp", "advantages", "mask")],
                                  policy_loss=name, agg=agg, **settings)
        if backend == "triton":
            kernel_out, kernel_grad = out, grad
    assert kernel_out.policy_loss.item() == pytest.approx(out.policy_loss.item(), rel=1e-10)
    assert rel_err(kernel_grad, grad) < 1e-10
