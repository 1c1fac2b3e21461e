"""rlhf_fast.dpo_loss: the fused kernels (through the interpreter) against the reference in
float64, and the reference against hand-computed values of each loss type's formula."""

import math

import pytest
import torch
import torch.nn.functional as F

import rlhf_fast
from helpers import kernel_backward, rel_err
from rlhf_fast import reference, types
from rlhf_fast.kernels import dpo_loss as kernel
from rlhf_fast.reference import EXO_DEFAULT_EPS
from rlhf_fast.types import (
    DPO_LABEL_SMOOTHING_TYPES,
    DPO_LENGTH_NORMALISED_TYPES,
    DPO_LOSS_TYPES,
    DPO_REDUCTIONS,
    DPO_REFERENCE_FREE_TYPES,
    DPO_SORTED_TYPES,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-2}
LOW_PRECISION = (torch.bfloat16, torch.float16)
INPUTS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
# exactly representable in fp32 (the kernels take scalars as fp32 unless the data is fp64),
# so an fp32 comparison measures the arithmetic, not the rounding of the setting
BETA = 0.125
KERNEL_BACKWARD = kernel_backward("dpo_loss")
NAN = float("nan")


def random_upstream(shape):
    """A random upstream gradient, |g| in [0.5, 1.5): never so small that a fp16 gradient
    underflows to subnormals (a test artefact, not a kernel error)."""
    return torch.randn(shape, dtype=torch.float64).sign() * (0.5 + torch.rand(shape,
                                                                          dtype=torch.float64))


def random_pairs(B=37, dtype=torch.float32, loss_type="sigmoid", lengths="int"):
    """Sequence log-probs -50 +- 5 randn (rounded to `dtype`), plus lengths for the
    length-normalised types: "int" random in [1, 64], "int32", "float" (non-integer, some
    below 1) or "zero" (ints with zeros, clamped to 1)."""
    pairs = {k: (-50 + 5 * torch.randn(B, dtype=torch.float64)).to(dtype) for k in INPUTS}
    if loss_type in DPO_LENGTH_NORMALISED_TYPES:
        for k in ("chosen_lengths", "rejected_lengths"):
            if lengths == "float":
                value = torch.rand(B, dtype=torch.float64) * 64
            else:
                value = torch.randint(1, 65, (B,))
                if lengths == "zero":
                    value[torch.randperm(B)[: max(1, B // 4)]] = 0
                if lengths == "int32":
                    value = value.int()
            pairs[k] = value
    return pairs


def run(fn, pairs, upstream=None, grads=INPUTS, **options):
    """Call `fn` on leaves built from `pairs` and backprop `upstream` (the loss's shape)
    through the loss. Returns (output, {name: grad})."""
    leaves = {k: (None if v is None else v.clone().requires_grad_(k in grads))
              for k, v in pairs.items()}
    out = fn(*(leaves[k] for k in INPUTS),
             **{k: v for k, v in leaves.items() if k not in INPUTS}, **options)
    if upstream is None:
        upstream = torch.ones(out.loss.shape, dtype=torch.float64)
    (out.loss * upstream.to(out.loss.dtype)).sum().backward()
    return out, {k: leaves[k].grad for k in grads if leaves[k] is not None}


def as_float64(pairs):
    return {k: (v.double() if v is not None and k in INPUTS else v) for k, v in pairs.items()}


def compare(pairs, tol, **options):
    """The kernels against the float64 reference on the same (rounded) inputs: all five
    outputs and the gradients of all four inputs for a random upstream gradient."""
    B = pairs["policy_chosen"].shape[0]
    shape = (B,) if options.get("reduction") == "none" else ()
    upstream = random_upstream(shape)
    out, g = run(rlhf_fast.dpo_loss, pairs, upstream, **options)
    ref, g_ref = run(reference.dpo_loss, as_float64(pairs), upstream, **options)
    assert type(out.loss.grad_fn).__name__ == KERNEL_BACKWARD  # the kernel ran
    fp64 = torch.float64 in (pairs["policy_chosen"].dtype, pairs["policy_rejected"].dtype)
    for name, a, b in zip(ref._fields, out, ref):
        assert a.dtype == (torch.float64 if fp64 else torch.float32), name
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
    assert rel_err(out.loss, ref.loss) < tol
    assert rel_err(out.chosen_rewards, ref.chosen_rewards) < tol
    assert rel_err(out.rejected_rewards, ref.rejected_rewards) < tol
    # exact ties of the rounded low-precision inputs may round either way (a pair or so)
    acc_tol = 1.01 / B if pairs["policy_chosen"].dtype in LOW_PRECISION else 1e-6
    assert abs(out.reward_accuracy.item() - ref.reward_accuracy.item()) <= acc_tol
    # the margin is a mean of differences: its rounding scales with the rewards' size
    scale = (ref.chosen_rewards.abs() + ref.rejected_rewards.abs()).mean().item()
    assert abs(out.reward_margin.item() - ref.reward_margin.item()) <= tol * max(1.0, scale)
    for name in g_ref:
        assert g[name].dtype == pairs[name].dtype, name
        assert torch.isfinite(g[name]).all(), name
        # a gradient is rounded to its input's dtype
        assert rel_err(g[name], g_ref[name]) < max(tol, TOL[pairs[name].dtype]), name
    return out, g


def options_for(loss_type, **kw):
    options = dict(beta=BETA, loss_type=loss_type)
    options.update(kw)
    return options


# ----------------------------------------------------------------- the reference by hand


def test_reference_log_sigmoid():
    xs = [-1e4, -800.0, -50.0, -20.0, -1.0, -1e-8, 0.0, 1e-8, 0.5, 1.0, 20.0, 50.0, 800.0,
          1e4]

    def exact(x):  # log(1 / (1 + e^-x)), arranged so that no exp overflows
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

    x = torch.tensor(xs, dtype=torch.float64)
    out = reference.log_sigmoid(x)
    assert torch.isfinite(out).all()
    assert out.tolist() == pytest.approx([exact(v) for v in xs], rel=1e-14, abs=0)
    assert rel_err(out, F.logsigmoid(x)) < 1e-14
    assert out[0].item() == -1e4  # no overflow at the far negative end
    assert out[xs.index(50.0)].item() == pytest.approx(-math.exp(-50.0), rel=1e-14)  # no 0
    f32 = reference.log_sigmoid(torch.tensor(xs, dtype=torch.float32))
    assert torch.isfinite(f32).all() and f32[0].item() == -1e4


def s(x):
    return 1 / (1 + math.exp(-x))


def ls(x):
    return math.log(s(x))


# Hand case, beta = 0.5: pair 0 has log-ratios a = 1, b = -1 (u = 1); pair 1 has
# a = -0.5, b = 0.5 (u = -0.5). Each type's loss written from its formula.
HAND_BETA = 0.5
HAND_A = (1.0, -0.5)
HAND_B = (-1.0, 0.5)


def hand_loss(loss_type, eps, a, b, beta=HAND_BETA):
    u = beta * (a - b)
    if loss_type in ("sigmoid", "sigmoid_norm"):
        return -(1 - eps) * ls(u) - eps * ls(-u)
    if loss_type == "ipo":
        return (a - b - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - u)
    if loss_type == "robust":
        return (-(1 - eps) * ls(u) + eps * ls(-u)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        eps = eps or 1e-3
        return s(u) * (ls(u) - math.log(1 - eps)) + s(-u) * (ls(-u) - math.log(eps))
    if loss_type == "nca_pair":
        return -ls(beta * a) - 0.5 * ls(-beta * a) - 0.5 * ls(-beta * b)
    if loss_type == "bco_pair":
        return -ls(beta * a) - ls(-beta * b)
    if loss_type == "sppo_hard":
        return (a - 1 / (2 * beta)) ** 2 + (b + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return 1 - s(beta * a) + s(beta * b)
    if loss_type == "discopop":  # tau 0.05: m = s(u / tau)
        m = s(u / 0.05)
        return -ls(u) * (1 - m) + math.exp(-u) * m
    assert loss_type == "apo_down"
    return s(beta * a) + 1 - s(beta * (a - b))


def hand_pairs(loss_type, dtype=torch.float64):
    def t(*v):
        return torch.tensor(v, dtype=dtype)

    if loss_type in DPO_LENGTH_NORMALISED_TYPES:
        # lengths 2, 4 and 0 (clamped to 1), 2: the log-probs are a, b times the length
        return dict(policy_chosen=t(-4.0, -10.0), policy_rejected=t(-5.0, -1.0),
                    ref_chosen=t(-6.0, -8.0), ref_rejected=t(-4.0, -2.0),
                    chosen_lengths=torch.tensor([2, 4]),
                    rejected_lengths=torch.tensor([0.0, 2.0]))
    return dict(policy_chosen=t(-2.0, -3.5), policy_rejected=t(-5.0, -1.5),
                ref_chosen=t(-3.0, -3.0), ref_rejected=t(-4.0, -2.0))


HAND_CASES = [(t, 0.0) for t in DPO_LOSS_TYPES if t not in DPO_SORTED_TYPES] + [
    ("sigmoid", 0.25), ("sigmoid_norm", 0.25), ("robust", 0.25), ("exo_pair", 0.25)
]


@pytest.mark.parametrize("loss_type, eps", HAND_CASES)
def test_hand_computed_case(loss_type, eps):
    expected = [hand_loss(loss_type, eps, a, b) for a, b in zip(HAND_A, HAND_B)]
    assert len(set(expected)) == 2 and max(expected) > 0
    options = dict(beta=HAND_BETA, loss_type=loss_type, label_smoothing=eps)
    for dtype in (torch.float64, torch.float32):
        pairs = hand_pairs(loss_type, dtype)
        rel, tiny = (1e-12, 1e-12) if dtype == torch.float64 else (1e-6, 1e-7)
        for fn in (reference.dpo_loss, rlhf_fast.dpo_loss):
            none = fn(*(pairs[k] for k in INPUTS), **options, reduction="none",
                      **{k: v for k, v in pairs.items() if k not in INPUTS})
            assert none.loss.tolist() == pytest.approx(expected, rel=rel, abs=tiny)
            assert none.chosen_rewards.tolist() == pytest.approx([0.5, -0.25], rel=rel)
            assert none.rejected_rewards.tolist() == pytest.approx([-0.5, 0.25], rel=rel)
            assert none.reward_accuracy.item() == 0.5
            assert none.reward_margin.item() == pytest.approx((1.0 - 0.5) / 2, rel=rel)
            for reduction, value in (("mean", sum(expected) / 2), ("sum", sum(expected))):
                out = fn(*(pairs[k] for k in INPUTS), **options, reduction=reduction,
                         **{k: v for k, v in pairs.items() if k not in INPUTS})
                assert out.loss.item() == pytest.approx(value, rel=rel, abs=tiny)


@pytest.mark.parametrize("loss_type", DPO_SORTED_TYPES)
def test_hand_computed_aot(loss_type):
    """AOT sorts over the batch: pc - pr = (3, -2) and rc - rr = (1, -1) sort to (-2, 3)
    and (-1, 1), margins (-1, 2); unpaired, a = (1, -0.5) and b = (-1, 0.5) sort to
    (-0.5, 1) and (-1, 0.5), margins (0.5, 0.5). The losses are the sorted positions'
    sigmoid losses; the rewards stay each pair's."""
    margins = (-1.0, 2.0) if loss_type == "aot" else (0.5, 0.5)
    eps = 0.1
    expected = [-(1 - eps) * ls(HAND_BETA * m) - eps * ls(-HAND_BETA * m) for m in margins]
    pairs = hand_pairs(loss_type)
    for fn in (reference.dpo_loss, rlhf_fast.dpo_loss):
        out = fn(*(pairs[k] for k in INPUTS), beta=HAND_BETA, loss_type=loss_type,
                 label_smoothing=eps, reduction="none")
        assert out.loss.tolist() == pytest.approx(expected, rel=1e-12)
        assert out.chosen_rewards.tolist() == pytest.approx([0.5, -0.25], rel=1e-12)
        assert out.reward_accuracy.item() == 0.5


def trl_scores(log_ratio, f_divergence_type, alpha):
    """TRL DPOTrainer's f-divergence scores, rewritten (trl/trainer/dpo_trainer.py)."""
    if f_divergence_type == "forward_kl":
        return -torch.exp(-log_ratio)
    if f_divergence_type == "js_divergence":
        return F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        t = torch.clamp((alpha - 1.0) * log_ratio, max=80.0)
        return torch.exp(t) * (1.0 / (alpha - 1.0))
    return log_ratio


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence",
                                               "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "nca_pair", "discopop", "ipo"])
def test_f_divergence_reference_equals_trl(f_divergence_type, loss_type):
    """The reference's f-DPO on TRL's formulas: the scores replace the log-ratios (and for
    ipo are then divided by the lengths); the rewards stay beta times the log-ratios."""
    pairs = random_pairs(B=9, dtype=torch.float64, loss_type=loss_type)
    pairs = {k: (v / 8 if k in INPUTS else v) for k, v in pairs.items()}  # |log-ratio| ~ 1
    alpha = 0.3
    options = dict(beta=0.5, loss_type=loss_type, f_divergence_type=f_divergence_type,
                   reduction="none")
    if f_divergence_type == "alpha_divergence":
        options["f_alpha_divergence_coef"] = alpha
    out = reference.dpo_loss(*(pairs[k] for k in INPUTS),
                             **{k: v for k, v in pairs.items() if k not in INPUTS}, **options)
    a = trl_scores(pairs["policy_chosen"] - pairs["ref_chosen"], f_divergence_type, alpha)
    b = trl_scores(pairs["policy_rejected"] - pairs["ref_rejected"], f_divergence_type, alpha)
    if loss_type == "ipo":
        a = a / pairs["chosen_lengths"].clamp(min=1)
        b = b / pairs["rejected_lengths"].clamp(min=1)
    expected = [hand_loss(loss_type, 0.0, x, y, beta=0.5) for x, y in zip(a.tolist(),
                                                                         b.tolist())]
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert torch.allclose(out.chosen_rewards * (pairs["chosen_lengths"].clamp(min=1)
                          if loss_type == "ipo" else 1),
                          0.5 * (pairs["policy_chosen"] - pairs["ref_chosen"]), rtol=1e-12)


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence",
                                               "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "bco_pair", "sppo_hard",
                                       "sigmoid_norm", "discopop"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_f_divergence_kernels_match_reference(f_divergence_type, loss_type, dtype):
    pairs = random_pairs(dtype=dtype, loss_type=loss_type)
    pairs = {k: (v / 8 if k in INPUTS else v) for k, v in pairs.items()}
    kw = dict(f_alpha_divergence_coef=-0.5) if f_divergence_type == "alpha_divergence" else {}
    compare(pairs, TOL[dtype], **options_for(loss_type, f_divergence_type=f_divergence_type,
                                             reduction="none", **kw))


def test_alpha_divergence_clamps_its_exponent_and_alpha_1_is_dpo():
    """(alpha - 1) x beyond 80: the score is e^80 / (alpha - 1), its gradient 0 (clamp);
    alpha = 1 is the reverse KL (DPO) exactly."""
    pc = torch.tensor([-1.0, -200.0], dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    for fn in (reference.dpo_loss, rlhf_fast.dpo_loss):
        x = pc.clone().requires_grad_()
        out = fn(x, zeros, zeros, zeros, f_divergence_type="alpha_divergence",
                 f_alpha_divergence_coef=0.5, reduction="sum", loss_type="bco_pair")
        out.loss.backward()
        assert torch.isfinite(out.loss) and x.grad[1] == 0 and x.grad[0] != 0
        dpo = fn(pc, zeros, zeros, zeros, reduction="none")
        alpha_one = fn(pc, zeros, zeros, zeros, reduction="none",
                       f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
        assert torch.equal(dpo.loss, alpha_one.loss)


def trl_discopop(delta_score, beta, tau):
    """TRL DPOTrainer's discopop loss, rewritten."""
    logits = delta_score * beta
    modulation = torch.sigmoid(logits / tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def test_discopop_equals_trl_and_takes_its_tau():
    pairs = random_pairs(B=11, dtype=torch.float64)
    pairs = {k: v / 8 for k, v in pairs.items()}
    delta = (pairs["policy_chosen"] - pairs["ref_chosen"]
             - pairs["policy_rejected"] + pairs["ref_rejected"])
    for tau in (0.05, 0.7):
        for fn in (reference.dpo_loss, rlhf_fast.dpo_loss):
            out = fn(*(pairs[k] for k in INPUTS), beta=0.5, loss_type="discopop",
                     discopop_tau=tau, reduction="none")
            torch.testing.assert_close(out.loss, trl_discopop(delta, 0.5, tau), rtol=1e-10,
                                       atol=1e-12)


@pytest.mark.parametrize("options, match", [
    (dict(loss_type="apo_zero", f_divergence_type="forward_kl"),
     "f_divergence_type must be 'reverse_kl' for loss_type 'apo_zero'"),
    (dict(loss_type="aot", f_divergence_type="js_divergence"),
     "f_divergence_type must be 'reverse_kl' for loss_type 'aot'"),
    (dict(f_alpha_divergence_coef=0.3), "f_alpha_divergence_coef is read only by"),
    (dict(discopop_tau=0.1), "discopop_tau is read only by loss_type 'discopop'"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau must be a finite float > 0"),
    (dict(f_divergence_type="kl"), "f_divergence_type must be one of"),
])
def test_new_options_are_checked_naming_them(options, match):
    pairs = hand_pairs("sigmoid")
    with pytest.raises(ValueError, match=match):
        rlhf_fast.dpo_loss(*(pairs[k] for k in INPUTS), **options)


def test_reward_accuracy_counts_strict_wins_only():
    # rewards (chosen, rejected): a tie, a win, a loss, a tie at zero; beta = 0.5
    pc = torch.tensor([-3.0, -1.0, -6.0, -2.0], dtype=torch.float64)
    rc = torch.tensor([-4.0, -3.0, -4.0, -2.0], dtype=torch.float64)
    pr = torch.tensor([-2.0, -5.0, -1.0, -7.0], dtype=torch.float64)
    rr = torch.tensor([-3.0, -5.0, -2.0, -7.0], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        for fn in (reference.dpo_loss, rlhf_fast.dpo_loss):
            out = fn(*(t.to(dtype) for t in (pc, pr, rc, rr)), beta=HAND_BETA)
            assert out.chosen_rewards.tolist() == [0.5, 1.0, -1.0, 0.0]
            assert out.rejected_rewards.tolist() == [0.5, 0.0, 0.5, 0.0]
            assert out.reward_accuracy.item() == 0.25
            assert out.reward_margin.item() == (0.0 + 1.0 - 1.5 + 0.0) / 4


def test_hand_computed_sigmoid_gradient():
    # mean loss: d/d policy_chosen_i = beta (-(1 - eps) s(-u_i) + eps s(u_i)) / B = -d/d ref
    eps = 0.25
    pairs = hand_pairs("sigmoid")
    _, g = run(rlhf_fast.dpo_loss, pairs, beta=HAND_BETA, label_smoothing=eps)
    expected = [HAND_BETA * (-(1 - eps) * s(-u) + eps * s(u)) / 2 for u in (1.0, -0.5)]
    assert g["policy_chosen"].tolist() == pytest.approx(expected, rel=1e-12)
    assert g["policy_rejected"].tolist() == pytest.approx([-e for e in expected], rel=1e-12)
    assert g["ref_chosen"].tolist() == pytest.approx([-e for e in expected], rel=1e-12)
    assert g["ref_rejected"].tolist() == pytest.approx(expected, rel=1e-12)


def test_hand_computed_hinge_gradient_and_kink():
    # pair 0 sits on the kink (u = 1): gradient 0 there, as torch's relu has it; pair 1
    # (u = -0.5 < 1): d/d policy_chosen of the mean = -beta / B
    pairs = hand_pairs("hinge")
    for fn in (reference.dpo_loss, rlhf_fast.dpo_loss):
        _, g = run(fn, pairs, beta=HAND_BETA, loss_type="hinge")
        assert g["policy_chosen"].tolist() == [0.0, -HAND_BETA / 2]
        assert g["policy_rejected"].tolist() == [0.0, HAND_BETA / 2]
        assert g["ref_chosen"].tolist() == [0.0, HAND_BETA / 2]


# ----------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("reduction", DPO_REDUCTIONS)
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_matches_reference_float64(loss_type, reduction, poisoned):
    pairs = random_pairs(dtype=torch.float64, loss_type=loss_type)
    compare(pairs, TOL[torch.float64], **options_for(loss_type, reduction=reduction))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_matches_reference_low_precision(loss_type, dtype, poisoned):
    for reduction in ("none", "mean") if dtype == torch.float32 else ("sum",):
        pairs = random_pairs(dtype=dtype, loss_type=loss_type)
        compare(pairs, TOL[dtype], **options_for(loss_type, reduction=reduction))


@pytest.mark.parametrize("lengths", ["int", "int32", "float", "zero"])
@pytest.mark.parametrize("loss_type", DPO_LENGTH_NORMALISED_TYPES)
def test_length_normalisation(loss_type, lengths):
    for dtype in (torch.float64, torch.float32):
        pairs = random_pairs(dtype=dtype, loss_type=loss_type, lengths=lengths)
        compare(pairs, TOL[dtype], **options_for(loss_type, reduction="none"))
    # zero and fractional lengths are clamped to 1: the same as passing 1 there
    one = torch.ones(37)
    clamped = {k: (torch.maximum(v.double(), one) if k.endswith("lengths") else v)
               for k, v in pairs.items()}
    a = run(rlhf_fast.dpo_loss, pairs, loss_type=loss_type, reduction="none")[0]
    b = run(rlhf_fast.dpo_loss, clamped, loss_type=loss_type, reduction="none")[0]
    assert rel_err(a.loss, b.loss) < 1e-6


def test_mixed_input_dtypes():
    pairs = random_pairs(dtype=torch.float32)
    pairs["ref_chosen"] = pairs["ref_chosen"].bfloat16()
    pairs["ref_rejected"] = pairs["ref_rejected"].half()
    compare(pairs, TOL[torch.float32], **options_for("sigmoid", reduction="none"))
    # an fp64 policy input: fp64 math. (Not with bf16 inputs: Triton's interpreter casts
    # fp64 -> bf16 wrongly, so their gradients would test the interpreter.)
    pairs["policy_rejected"] = pairs["policy_rejected"].double()
    pairs["ref_chosen"] = pairs["ref_chosen"].float()
    compare(pairs, TOL[torch.float64], **options_for("bco_pair", reduction="mean"))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.49])
@pytest.mark.parametrize("loss_type", DPO_LABEL_SMOOTHING_TYPES)
def test_label_smoothing(loss_type, eps):
    pairs = random_pairs(dtype=torch.float32, loss_type=loss_type)
    compare(pairs, TOL[torch.float32],
            **options_for(loss_type, label_smoothing=eps, reduction="none"))


def test_label_smoothing_changes_the_loss():
    pairs = random_pairs(B=9, dtype=torch.float64)
    for loss_type in ("sigmoid", "robust", "exo_pair"):
        a = rlhf_fast.dpo_loss(*(pairs[k] for k in INPUTS), loss_type=loss_type)
        b = rlhf_fast.dpo_loss(*(pairs[k] for k in INPUTS), loss_type=loss_type,
                               label_smoothing=0.2)
        assert abs(a.loss.item() - b.loss.item()) > 1e-3, loss_type


def test_exo_pair_zero_smoothing_is_the_default_eps():
    pairs = random_pairs(B=11, dtype=torch.float32)
    for fn in (rlhf_fast.dpo_loss, reference.dpo_loss):
        zero, g_zero = run(fn, pairs, loss_type="exo_pair", label_smoothing=0.0,
                           reduction="none")
        default, g_default = run(fn, pairs, loss_type="exo_pair",
                                 label_smoothing=EXO_DEFAULT_EPS, reduction="none")
        assert all(torch.equal(x, y) for x, y in zip(zero, default))
        assert all(torch.equal(g_zero[k], g_default[k]) for k in INPUTS)
    assert EXO_DEFAULT_EPS == 1e-3


# ----------------------------------------------------------------- reference-free


@pytest.mark.parametrize("loss_type", DPO_REFERENCE_FREE_TYPES)
def test_reference_free_equals_zero_reference(loss_type):
    pairs = random_pairs(B=13, dtype=torch.float32, loss_type=loss_type)
    free = dict(pairs, ref_chosen=None, ref_rejected=None)
    zero = dict(pairs, ref_chosen=torch.zeros(13), ref_rejected=torch.zeros(13))
    upstream = random_upstream(13)
    out, g = run(rlhf_fast.dpo_loss, free, upstream, loss_type=loss_type, reduction="none")
    out_zero, g_zero = run(rlhf_fast.dpo_loss, zero, upstream, loss_type=loss_type,
                           reduction="none")
    assert type(out.loss.grad_fn).__name__ == KERNEL_BACKWARD
    assert set(g) == {"policy_chosen", "policy_rejected"}
    assert all(torch.equal(x, y) for x, y in zip(out, out_zero))
    assert all(torch.equal(g[k], g_zero[k]) for k in g)
    ref, _ = run(reference.dpo_loss, as_float64(free), upstream, loss_type=loss_type,
                 reduction="none")
    assert rel_err(out.loss, ref.loss) < TOL[torch.float32]


@pytest.mark.parametrize(
    "loss_type", [t for t in DPO_LOSS_TYPES if t not in DPO_REFERENCE_FREE_TYPES]
)
def test_reference_required_for_the_other_types(loss_type):
    pairs = random_pairs(B=3, loss_type=loss_type)
    with pytest.raises(ValueError, match="ref_chosen"):
        rlhf_fast.dpo_loss(pairs["policy_chosen"], pairs["policy_rejected"], None, None,
                           loss_type=loss_type)


def test_one_reference_missing_is_an_error():
    pairs = random_pairs(B=3)
    pc, pr, rc, rr = (pairs[k] for k in INPUTS)
    with pytest.raises(ValueError, match="ref_chosen"):
        rlhf_fast.dpo_loss(pc, pr, rc, None)
    with pytest.raises(ValueError, match="ref_rejected"):
        rlhf_fast.dpo_loss(pc, pr, None, rr)


# ----------------------------------------------------------------- extreme values


def large_margin_pairs(B, dtype):
    """Log-probs 0 or -1e4 minus a little noise in 1/64 steps: log-ratios near +-1e4 and 0.
    Their differences are exact in fp32 too, so an fp32 comparison is not about the
    cancellation in (pc - rc) - (pr - rr) that any fp32 implementation has."""
    def draw():
        return (-1e4 * torch.randint(0, 2, (B,)) - torch.randint(0, 64, (B,)) / 64).to(dtype)

    pairs = {k: draw() for k in INPUTS}
    pairs["policy_chosen"][:2] = torch.tensor([0.0, -1e4])  # a = +-1e4 for sure
    pairs["ref_chosen"][:2] = torch.tensor([-1e4, 0.0])
    return pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_large_margins(loss_type, beta, dtype):
    pairs = large_margin_pairs(16, dtype)
    if loss_type in DPO_LENGTH_NORMALISED_TYPES:
        pairs["chosen_lengths"] = 2 ** torch.randint(0, 3, (16,))  # exact divisions
        pairs["rejected_lengths"] = 2 ** torch.randint(0, 3, (16,))
    out, g = compare(pairs, TOL[dtype], beta=beta, loss_type=loss_type, reduction="none")
    ref = reference.dpo_loss(*(pairs[k].double() for k in INPUTS), beta=beta,
                             loss_type=loss_type, reduction="none",
                             **{k: v for k, v in pairs.items() if k not in INPUTS})
    assert (out.loss[ref.loss == 0] == 0).all()  # saturated pairs agree exactly


def tiny_loss_pairs(loss_type):
    """Exactly representable log-probs whose loss is ~ e^-x, x = 5 .. 80 (beta = 1)."""
    x = torch.arange(40, 641, 20, dtype=torch.float64) / 8
    base = -50.0 * torch.ones_like(x)
    if loss_type == "sigmoid_norm":  # lengths 2: a = x after normalisation
        return dict(policy_chosen=base + 2 * x, policy_rejected=base, ref_chosen=base,
                    ref_rejected=base, chosen_lengths=torch.full(x.shape, 2),
                    rejected_lengths=torch.full(x.shape, 2))
    if loss_type == "apo_down":  # s(a) + s(-(a - b)), a = -x, b = -2x
        return dict(policy_chosen=base - x, policy_rejected=base - 2 * x, ref_chosen=base,
                    ref_rejected=base)
    b = -x if loss_type in ("bco_pair", "apo_zero") else 0 * x
    return dict(policy_chosen=base + x, policy_rejected=base + b, ref_chosen=base,
                ref_rejected=base)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "sigmoid_norm", "bco_pair",
                                       "apo_zero", "apo_down"])
def test_tiny_losses_keep_relative_precision(loss_type):
    pairs = tiny_loss_pairs(loss_type)
    f32 = {k: (v.float() if k in INPUTS else v) for k, v in pairs.items()}
    out = run(rlhf_fast.dpo_loss, f32, beta=1.0, loss_type=loss_type, reduction="none")[0]
    if loss_type.startswith("apo"):
        # the reference's 1 - s(x) loses these to cancellation: the exact value, in float64
        a = (pairs["policy_chosen"] - pairs["ref_chosen"])
        b = (pairs["policy_rejected"] - pairs["ref_rejected"])
        other = b if loss_type == "apo_zero" else -(a - b)
        expected = torch.sigmoid(-a if loss_type == "apo_zero" else a) + torch.sigmoid(other)
    else:
        expected = reference.dpo_loss(*(pairs[k] for k in INPUTS), beta=1.0,
                                      loss_type=loss_type, reduction="none",
                                      **{k: v for k, v in pairs.items() if k not in INPUTS}
                                      ).loss
    assert (expected > 0).all() and expected.min() < 1e-30
    err = (out.loss.double() - expected).abs() / expected
    assert (err < 1e-5).all(), err.max()


def test_exo_pair_large_positive_margin_fp32():
    u = torch.tensor([10.0, 20.0, 50.0, 100.0])
    out = rlhf_fast.dpo_loss(u, torch.zeros(4), None, None, beta=1.0, loss_type="exo_pair",
                             reduction="none")
    ref = reference.dpo_loss(u.double(), torch.zeros(4, dtype=torch.float64), None, None,
                             beta=1.0, loss_type="exo_pair", reduction="none")
    assert rel_err(out.loss, ref.loss) < 1e-5


def test_aot_sends_a_nan_to_the_sorts_end():
    """AOT sorts over the batch: a NaN log-prob lands at the end of its sort, both
    backends alike, and the mean is NaN."""
    pairs = random_pairs(B=9, dtype=torch.float64)
    pairs["policy_chosen"][4] = NAN
    for loss_type in DPO_SORTED_TYPES:
        outs = [fn(*(pairs[k] for k in INPUTS), beta=BETA, loss_type=loss_type,
                   reduction="none") for fn in (reference.dpo_loss, rlhf_fast.dpo_loss)]
        for out in outs:
            assert out.loss[-1].isnan() and torch.isfinite(out.loss[:-1]).all()
        assert rel_err(outs[1].loss[:-1], outs[0].loss[:-1]) < 1e-12


@pytest.mark.parametrize(
    "loss_type",
    [t for t in DPO_LOSS_TYPES if t not in DPO_SORTED_TYPES],
)
def test_nan_in_one_pair_stays_in_that_pair(loss_type):
    pairs = random_pairs(B=9, dtype=torch.float32, loss_type=loss_type)
    pairs["policy_chosen"][4] = NAN
    upstream = random_upstream(9)
    out, g = run(rlhf_fast.dpo_loss, pairs, upstream, **options_for(loss_type, reduction="none"))
    ref, g_ref = run(reference.dpo_loss, as_float64(pairs), upstream,
                     **options_for(loss_type, reduction="none"))
    others = torch.arange(9) != 4
    assert torch.isnan(out.loss[4]) and torch.isnan(out.chosen_rewards[4])
    assert torch.isfinite(out.loss[others]).all()
    assert torch.isfinite(out.chosen_rewards[others]).all()
    assert torch.isfinite(out.rejected_rewards).all()  # pair 4's rejected answer is fine
    assert rel_err(out.loss[others], ref.loss[others]) < TOL[torch.float32]
    assert rel_err(out.rejected_rewards, ref.rejected_rewards) < TOL[torch.float32]
    for k in INPUTS:
        assert torch.isfinite(g[k][others]).all(), k
        assert rel_err(g[k][others], g_ref[k][others]) < TOL[torch.float32], k
    mean = rlhf_fast.dpo_loss(*(pairs[k] for k in INPUTS), **options_for(loss_type),
                              **{k: v for k, v in pairs.items() if k not in INPUTS})
    assert torch.isnan(mean.loss)


@pytest.mark.parametrize("where", INPUTS)
@pytest.mark.parametrize("loss_type", [t for t in DPO_LOSS_TYPES if t not in DPO_SORTED_TYPES])
def test_nan_pair_gets_nan_gradients_in_both_backends(loss_type, where, monkeypatch):
    """A NaN log-prob gives its pair NaN gradients, in every loss type and both backends
    alike: the hinge gradient, a comparison u < 1 that a NaN fails, was 0 in the kernel and
    +-beta in the reference. The NaN input's own gradient and its log-ratio partner's are
    NaN; both backends give the same gradients, NaN at the same places; the other pairs
    keep their clean gradients."""
    partner = dict(zip(INPUTS, ("ref_chosen", "ref_rejected", "policy_chosen",
                                "policy_rejected")))[where]
    pairs = random_pairs(B=9, dtype=torch.float64, loss_type=loss_type)
    upstream = random_upstream(9)
    options = options_for(loss_type, reduction="none")
    _, clean = run(reference.dpo_loss, pairs, upstream, **options)
    pairs[where][4] = NAN
    others = torch.arange(9) != 4
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
        out, grads[backend] = run(rlhf_fast.dpo_loss, pairs, upstream, **options)
        assert out.loss[4].isnan(), backend
        assert grads[backend][where][4].isnan() and grads[backend][partner][4].isnan(), backend
        for k in INPUTS:
            assert rel_err(grads[backend][k][others], clean[k][others]) < TOL[torch.float64], k
    for k in INPUTS:
        assert torch.equal(grads["triton"][k].isnan(), grads["torch"][k].isnan()), k
        finite = ~grads["torch"][k].isnan()
        assert rel_err(grads["triton"][k][finite], grads["torch"][k][finite]) < 1e-10, k


# ----------------------------------------------------------------- shapes


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_batch_of_one(loss_type, poisoned):
    # float64: a single pair has no batch norm to hide an fp32 cancellation in (e.g. the
    # apo_down gradient, a difference of two sigmoid slopes), and B = 1 tests indexing
    for reduction in DPO_REDUCTIONS:
        pairs = random_pairs(B=1, dtype=torch.float64, loss_type=loss_type)
        compare(pairs, TOL[torch.float64], **options_for(loss_type, reduction=reduction))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "sigmoid_norm"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_large_batch_crosses_blocks(loss_type, reduction, poisoned):
    B = 2 * kernel.FWD_BLOCK + 77  # several forward iterations and backward programs
    assert kernel.BWD_BLOCK < B
    for dtype in (torch.float64, torch.float32):
        pairs = random_pairs(B=B, dtype=dtype, loss_type=loss_type)
        compare(pairs, TOL[dtype], **options_for(loss_type, reduction=reduction))


def test_batch_invariance_per_pair():
    pairs = random_pairs(B=50, dtype=torch.float32, loss_type="ipo")
    full, g_full = run(rlhf_fast.dpo_loss, pairs, loss_type="ipo", reduction="none")
    for i in (0, 17, 49):
        alone, g_alone = run(rlhf_fast.dpo_loss, {k: v[i: i + 1] for k, v in pairs.items()},
                             loss_type="ipo", reduction="none")
        for name in ("loss", "chosen_rewards", "rejected_rewards"):
            assert torch.equal(getattr(alone, name), getattr(full, name)[i: i + 1]), name
        assert all(torch.equal(g_alone[k], g_full[k][i: i + 1]) for k in INPUTS)


def test_non_contiguous_inputs():
    big = random_pairs(B=40, dtype=torch.float32)
    strided = {k: v[::2] for k, v in big.items()}
    assert not strided["policy_chosen"].is_contiguous()
    contiguous = {k: v.contiguous() for k, v in strided.items()}
    upstream = random_upstream(20)
    a, ga = run(rlhf_fast.dpo_loss, strided, upstream, reduction="none")
    b, gb = run(rlhf_fast.dpo_loss, contiguous, upstream, reduction="none")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(ga[k], gb[k]) for k in INPUTS)


def test_expanded_upstream_gradient():
    # loss.sum() hands the backward a stride-0 upstream gradient: same as reduction "sum"
    pairs = random_pairs(B=12, dtype=torch.float64, loss_type="sigmoid_norm")
    leaves = {k: v.clone().requires_grad_(k in INPUTS) for k, v in pairs.items()}
    lengths = {k: v for k, v in leaves.items() if k not in INPUTS}
    none = rlhf_fast.dpo_loss(*(leaves[k] for k in INPUTS), loss_type="sigmoid_norm",
                              reduction="none", **lengths)
    none.loss.sum().backward()
    summed, g_sum = run(rlhf_fast.dpo_loss, pairs, loss_type="sigmoid_norm", reduction="sum")
    assert summed.loss.item() == pytest.approx(none.loss.sum().item(), rel=1e-12)
    for k in INPUTS:
        assert rel_err(leaves[k].grad, g_sum[k]) < 1e-14, k


def test_empty_batch_raises():
    z = torch.zeros(0)
    with pytest.raises(ValueError, match="policy_chosen"):
        rlhf_fast.dpo_loss(z, z, z, z)


# ----------------------------------------------------------------- gradients


def away_from_kinks(pairs, loss_type):
    """Move the hinge's u = beta * delta at least 0.1 away from its kink at 1."""
    if loss_type == "hinge":
        a = pairs["policy_chosen"] - pairs["ref_chosen"]
        b = pairs["policy_rejected"] - pairs["ref_rejected"]
        near = (BETA * (a - b) - 1).abs() < 0.1
        pairs["policy_chosen"] = pairs["policy_chosen"] + near * 4.0  # u moves by 0.5
    return pairs


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_gradcheck_float64(loss_type, reduction):
    pairs = away_from_kinks(random_pairs(B=3, dtype=torch.float64, loss_type=loss_type),
                            loss_type)
    leaves = tuple(pairs[k].clone().requires_grad_(True) for k in INPUTS)
    lengths = {k: v for k, v in pairs.items() if k not in INPUTS}

    def loss(*args):
        return rlhf_fast.dpo_loss(*args, **lengths, **options_for(loss_type,
                                                                  reduction=reduction)).loss

    # the "none" Jacobian is diagonal: a random projection (fast mode) checks it cheaply
    assert torch.autograd.gradcheck(loss, leaves, fast_mode=reduction == "none")


def test_statistics_are_detached_and_the_loss_is_not():
    pairs = random_pairs(B=5)
    for reduction in DPO_REDUCTIONS:
        out, _ = run(rlhf_fast.dpo_loss, pairs, reduction=reduction)
        assert out.loss.requires_grad and out.loss.grad_fn is not None
        assert not any(t.requires_grad for t in out[1:])
        assert all(t.grad_fn is None for t in out[1:])


def test_gradients_only_where_asked():
    pairs = random_pairs(B=6)
    out, g = run(rlhf_fast.dpo_loss, pairs, grads=("policy_chosen", "policy_rejected"))
    assert set(g) == {"policy_chosen", "policy_rejected"}
    _, g_all = run(rlhf_fast.dpo_loss, pairs)
    assert all(torch.equal(g[k], g_all[k]) for k in g)


# ----------------------------------------------------------------- module and dispatch


@pytest.mark.parametrize("loss_type, eps, reduction",
                         [("sigmoid", 0.1, "mean"), ("ipo", 0.0, "none"),
                          ("robust", 0.2, "sum"), ("apo_down", 0.0, "mean")])
def test_dpo_loss_module_matches_function(loss_type, eps, reduction):
    pairs = random_pairs(B=10, loss_type=loss_type)
    settings = dict(beta=0.25, loss_type=loss_type, label_smoothing=eps, reduction=reduction)
    module = rlhf_fast.DPOLoss(**settings)
    assert f"loss_type={loss_type!r}" in repr(module)
    upstream = random_upstream(10 if reduction == "none" else ())
    a, ga = run(module, pairs, upstream)
    b, gb = run(rlhf_fast.dpo_loss, pairs, upstream, **settings)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(ga[k], gb[k]) for k in INPUTS)


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm", "nca_pair"])
def test_backend_switch_runs_the_reference(loss_type, monkeypatch):
    pairs = random_pairs(B=8, loss_type=loss_type)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    out, g = run(rlhf_fast.dpo_loss, pairs, loss_type=loss_type, label_smoothing=0.0)
    assert type(out.loss.grad_fn).__name__ != KERNEL_BACKWARD
    ref, g_ref = run(reference.dpo_loss, pairs, loss_type=loss_type)
    assert all(torch.equal(x, y) for x, y in zip(out, ref))
    assert all(torch.equal(g[k], g_ref[k]) for k in INPUTS)


# ----------------------------------------------------------------- errors


def _call(loss_type="sigmoid", **overrides):
    pairs = random_pairs(B=3, loss_type=loss_type)
    args = dict(pairs, beta=0.1, loss_type=loss_type)
    args.update(overrides)
    tensors = [args.pop(k) for k in INPUTS]
    return rlhf_fast.dpo_loss(*tensors, **args)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"loss_type": "dpo"}, ValueError, "loss_type"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"reduction": None}, ValueError, "reduction"),
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": -0.1}, ValueError, "beta"),
        ({"beta": float("inf")}, ValueError, "beta"),
        ({"beta": NAN}, ValueError, "beta"),
        ({"beta": True}, TypeError, "beta"),
        ({"beta": "0.1"}, TypeError, "beta"),
        # finite, but beyond fp32 (the kernels take beta as fp32): inf or 0 there
        ({"beta": 1e300}, ValueError, "beta must be representable in fp32"),
        ({"beta": 1e-300}, ValueError, r"beta must .*\[1.17549e-38, 3.40282e\+38\]"),
        ({"label_smoothing": 1e-300}, ValueError, "label_smoothing must be representable"),
        ({"label_smoothing": 0.5}, ValueError, "label_smoothing"),
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        ({"label_smoothing": NAN}, ValueError, "label_smoothing"),
        ({"label_smoothing": False}, TypeError, "label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError, "label_smoothing"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, ValueError, "label_smoothing"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, ValueError, "label_smoothing"),
        ({"loss_type": "nca_pair", "label_smoothing": 0.1}, ValueError, "label_smoothing"),
        ({"policy_chosen": [-1.0, -2.0, -3.0]}, TypeError, "policy_chosen"),
        ({"policy_rejected": 1.0}, TypeError, "policy_rejected"),
        ({"ref_chosen": [-1.0, -2.0, -3.0]}, TypeError, "ref_chosen"),
        ({"policy_chosen": torch.zeros(3, dtype=torch.long)}, TypeError, "policy_chosen"),
        ({"policy_rejected": torch.zeros(3, dtype=torch.int32)}, TypeError,
         "policy_rejected"),
        ({"ref_rejected": torch.zeros(3, dtype=torch.bool)}, TypeError, "ref_rejected"),
        ({"policy_chosen": torch.zeros(3, 1)}, ValueError, "policy_chosen"),
        ({"policy_chosen": torch.tensor(-1.0)}, ValueError, "policy_chosen"),
        ({"policy_rejected": torch.zeros(4)}, ValueError, "policy_rejected"),
        ({"ref_chosen": torch.zeros(2)}, ValueError, "ref_chosen"),
        ({"ref_rejected": torch.zeros(3, 1)}, ValueError, "ref_rejected"),
        ({"loss_type": "ipo", "chosen_lengths": None}, ValueError, "chosen_lengths"),
        ({"loss_type": "sigmoid_norm", "rejected_lengths": None}, ValueError,
         "rejected_lengths"),
        ({"loss_type": "ipo", "chosen_lengths": torch.ones(4)}, ValueError, "chosen_lengths"),
        ({"loss_type": "sigmoid_norm", "rejected_lengths": torch.ones(3, 1)}, ValueError,
         "rejected_lengths"),
        ({"loss_type": "ipo", "chosen_lengths": [1, 2, 3]}, TypeError, "chosen_lengths"),
        ({"loss_type": "ipo", "rejected_lengths": torch.tensor([4, -2, 3])}, ValueError,
         "rejected_lengths must be token counts >= 0, found -2"),
        # NaN is not < 0: it must be rejected as a negative length is
        ({"loss_type": "ipo", "chosen_lengths": torch.tensor([1.0, NAN, 3.0])}, ValueError,
         "chosen_lengths must be token counts >= 0, found nan"),
        ({"loss_type": "sigmoid_norm", "rejected_lengths": torch.tensor([NAN, -1.0, 3.0])},
         ValueError, "rejected_lengths must be token counts >= 0, found nan"),
        ({"loss_type": "ipo", "rejected_lengths": torch.ones(3, dtype=torch.bool)},
         TypeError, "rejected_lengths"),
        ({"chosen_lengths": torch.ones(3)}, ValueError, "chosen_lengths"),
        ({"loss_type": "hinge", "rejected_lengths": torch.ones(3)}, ValueError,
         "rejected_lengths"),
        # another device (meta tensors exist without a GPU)
        ({"policy_rejected": torch.zeros(3, device="meta")}, ValueError, "policy_rejected"),
        ({"ref_chosen": torch.zeros(3, device="meta")}, ValueError, "ref_chosen"),
        ({"loss_type": "ipo", "chosen_lengths": torch.ones(3, device="meta")}, ValueError,
         "chosen_lengths"),
    ],
)
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(beta=0.0), "beta must be a finite float > 0, got 0.0"),
        (dict(beta=1e300), "beta must be representable in fp32"),
        (dict(loss_type="dpo"), "loss_type must be one of"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing must be 0"),
    ],
)
def test_dpo_loss_module_validates_where_it_is_built(settings, match):
    with pytest.raises(ValueError, match=match):
        rlhf_fast.DPOLoss(**settings)


@pytest.mark.parametrize("loss_type", sorted(types.DPO_LENGTH_NORMALISED_TYPES))
def test_nan_length_gives_nan_for_its_pair(loss_type):
    """max(length, 1) must keep a NaN length NaN (as torch.clamp does), not read it as 1.

    dpo_loss rejects NaN lengths on CPU; on CUDA they reach the kernels unchecked (the
    check would sync), so the kernels are launched here as dpo_loss launches them."""
    policy = torch.tensor([-5.0, -6.0])
    zeros = torch.zeros(2)
    lengths = dict(chosen_lengths=torch.tensor([NAN, 3.0]),
                   rejected_lengths=torch.tensor([2.0, 2.0]))
    cfg = kernel.DPOKernelConfig(loss_code=kernel.LOSS_CODES[loss_type], beta=0.1, eps=0.0,
                                 reduction_code=kernel.REDUCTION_CODES["none"])
    out = kernel.dpo_forward(policy, policy - 1, zeros, zeros, *lengths.values(), cfg)[0]
    ref = reference.dpo_loss(policy, policy - 1, zeros, zeros, loss_type=loss_type,
                             reduction="none", **lengths).loss
    assert out[0].isnan() and ref[0].isnan()
    assert rel_err(out[1], ref[1]) < 1e-6
    with pytest.raises(ValueError, match="chosen_lengths must be token counts >= 0, found nan"):
        rlhf_fast.dpo_loss(policy, policy - 1, zeros, zeros, loss_type=loss_type,
                           reduction="none", **lengths)


# ------------------------------------ mixes (TRL's MPO), sft, RPO and WPO's pair weights

MIXES = {
    "mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "rpo": dict(loss_type="sigmoid", rpo_alpha=0.5),
    "ipo-hinge": dict(loss_type=["ipo", "hinge"], loss_weights=[1.0, -0.5]),
    "aot-norm": dict(loss_type=["aot", "sigmoid_norm"], label_smoothing=0.1),
    "sft": dict(loss_type="sft"),
    "weighted-sigmoid": dict(loss_type="sigmoid", label_smoothing=0.2),
}
MIX_GRADS = INPUTS + ("sft_logps",)


def mix_pairs(mix, dtype, weighted, sft_logps=False, B=23):
    pairs = random_pairs(B, dtype, "ipo")  # with both lengths, some read, some not
    kinds = [mix["loss_type"]] if isinstance(mix["loss_type"], str) else mix["loss_type"]
    if not set(kinds) & {"ipo", "sigmoid_norm"}:
        del pairs["rejected_lengths"]
        if "sft" not in kinds and "rpo_alpha" not in mix:
            del pairs["chosen_lengths"]
    if weighted:
        pairs["weights"] = torch.rand(B, dtype=torch.float64) + 0.25
    if sft_logps:
        pairs["sft_logps"] = (-60 + 5 * torch.randn(B, dtype=torch.float64)).to(dtype)
    return pairs


def run_mix(fn, pairs, upstream, **options):
    leaves = {k: v.clone().requires_grad_(k in MIX_GRADS) for k, v in pairs.items()}
    out = fn(*(leaves[k] for k in INPUTS),
             **{k: v for k, v in leaves.items() if k not in INPUTS}, **options)
    (out.loss * upstream.to(out.loss.dtype)).sum().backward()
    return out, {k: leaves[k].grad for k in MIX_GRADS if k in leaves}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix, weighted, reduction", [
    (mix, weighted, reduction) for mix in MIXES for weighted in (False, True)
    for reduction in DPO_REDUCTIONS
    # aot's sorted positions take no pair weights, nor "none" in a mix (refused: below)
    if not ("aot" in MIXES[mix]["loss_type"] and (weighted or reduction == "none"))])
def test_mix_matches_reference(mix, dtype, weighted, reduction):
    """Every term's fused kernel (reduction none), their weighted sum times the pair
    weights, reduced: the float64 reference on the same rounded inputs."""
    options = MIXES[mix]
    pairs = mix_pairs(options, dtype, weighted, sft_logps=mix == "mpo")
    B = pairs["policy_chosen"].shape[0]
    # positive: the sft term's gradient sums the upstream over the pairs, and a sum that
    # cancels would measure fp32's rounding of the terms against a tiny result
    upstream = random_upstream((B,) if reduction == "none" else ()).abs()
    out, g = run_mix(rlhf_fast.dpo_loss, pairs, upstream, beta=BETA, reduction=reduction,
                     **options)
    ref, g_ref = run_mix(reference.dpo_loss, as_float64(pairs), upstream, beta=BETA,
                         reduction=reduction, **options)
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    for name, a in zip(ref._fields, out):
        assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
    for name in ("loss", "chosen_rewards", "rejected_rewards"):
        assert rel_err(getattr(out, name), getattr(ref, name)) < tol, name
    # as `compare`: a near-tie of rounded low-precision rewards may flip a pair or so, and
    # the margin's rounding scales with the rewards
    acc_tol = 1.01 / B if dtype in LOW_PRECISION else 1e-6
    assert abs(out.reward_accuracy.item() - ref.reward_accuracy.item()) <= acc_tol
    scale = (ref.chosen_rewards.abs() + ref.rejected_rewards.abs()).mean().item()
    assert abs(out.reward_margin.item() - ref.reward_margin.item()) <= tol * max(1.0, scale)
    for name in g_ref:
        if g_ref[name] is None:  # (sft alone reads policy_chosen only)
            assert g[name] is None, name
            continue
        assert g[name].dtype == pairs[name].dtype, name
        assert rel_err(g[name], g_ref[name]) < tol, name


def test_mix_is_the_weighted_sum_of_its_single_types():
    """The fused mix against the fused single types, summed here: the combination's own
    arithmetic (weights, reduction, which lengths each type reads)."""
    pairs = mix_pairs(MIXES["mpo"] | {"loss_type": ["sigmoid_norm", "nca_pair", "sft"]},
                      torch.float64, weighted=True)
    weights, lengths = pairs.pop("weights"), {
        k: pairs.pop(k) for k in ("chosen_lengths", "rejected_lengths")}
    args = [pairs[k] for k in INPUTS]
    mix = rlhf_fast.dpo_loss(*args, **lengths, weights=weights, beta=BETA,
                             loss_type=["sigmoid_norm", "nca_pair", "sft"],
                             loss_weights=[0.5, 2.0, 0.25])
    norm = rlhf_fast.dpo_loss(*args, **lengths, beta=BETA, loss_type="sigmoid_norm",
                              reduction="none")
    nca = rlhf_fast.dpo_loss(*args, beta=BETA, loss_type="nca_pair", reduction="none")
    nll = -args[0].sum() / lengths["chosen_lengths"].double().clamp(min=1).sum()
    expected = ((0.5 * norm.loss + 2.0 * nca.loss + 0.25 * nll) * weights).mean()
    assert rel_err(mix.loss, expected) < 1e-12
    # the statistics are the first type's (sigmoid_norm's length-normalised rewards)
    for name in ("chosen_rewards", "rejected_rewards", "reward_accuracy", "reward_margin"):
        assert torch.equal(getattr(mix, name), getattr(norm, name)), name


def test_sft_is_trl_cross_entropy_over_the_chosen_tokens():
    """TRL's sft term: F.cross_entropy over every chosen token of the batch (the logits
    of 3 chosen answers of different lengths), equal to dpo_loss's from the sums."""
    logits = torch.randn(3, 6, 13, dtype=torch.float64)
    labels = torch.randint(0, 13, (3, 6))
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0]]).bool()
    trl = F.cross_entropy(logits[mask], labels[mask])
    chosen = rlhf_fast.sequence_logps(rlhf_fast.logprobs(logits, labels), mask)
    rejected = torch.randn(3, dtype=torch.float64)
    out = rlhf_fast.dpo_loss(chosen, rejected, None, None, loss_type="sft",
                             chosen_lengths=mask.sum(-1))
    assert rel_err(out.loss, trl) < 1e-12
    none = rlhf_fast.dpo_loss(chosen, rejected, None, None, loss_type="sft",
                              chosen_lengths=mask.sum(-1), reduction="none")
    assert torch.equal(none.loss, trl.expand(3).to(none.loss.dtype)) or \
        rel_err(none.loss, trl.expand(3)) < 1e-12  # TRL's expand: the same for every pair
    assert torch.equal(out.chosen_rewards, BETA * 0 + 0.1 * chosen)  # sft alone: raw rewards


def test_rpo_alpha_is_sigmoid_plus_weighted_sft():
    pairs = mix_pairs(MIXES["rpo"], torch.float64, weighted=False)
    args = [pairs[k] for k in INPUTS]
    rpo = rlhf_fast.dpo_loss(*args, chosen_lengths=pairs["chosen_lengths"], rpo_alpha=0.3)
    mix = rlhf_fast.dpo_loss(*args, chosen_lengths=pairs["chosen_lengths"],
                             loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3])
    assert torch.equal(rpo.loss, mix.loss)
    plain = rlhf_fast.dpo_loss(*args)
    assert rpo.loss > plain.loss  # (the NLL of log-probs near -50 is positive)


def test_pair_weights_scale_each_pair_and_are_not_differentiated():
    pairs = random_pairs(9, torch.float64)
    weights = (torch.rand(9, dtype=torch.float64) + 0.5).requires_grad_()
    leaves = [pairs[k].clone().requires_grad_() for k in INPUTS]
    out = rlhf_fast.dpo_loss(*leaves, weights=weights, reduction="none")
    plain = rlhf_fast.dpo_loss(*[x.detach() for x in leaves], reduction="none")
    assert rel_err(out.loss, plain.loss * weights.detach()) < 1e-15
    out.loss.sum().backward()
    assert weights.grad is None
    unweighted = [x.detach().clone().requires_grad_() for x in leaves]
    rlhf_fast.dpo_loss(*unweighted, reduction="none").loss.sum().backward()
    for x, y in zip(leaves, unweighted):
        assert rel_err(x.grad, y.grad * weights.detach()) < 1e-15


@pytest.mark.parametrize("options, tensors, error, match", [
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), {}, ValueError,
     "loss_weights must have one weight per loss_type"),
    (dict(loss_type=["sigmoid", "sft"], rpo_alpha=0.5), {"chosen_lengths"}, ValueError,
     "rpo_alpha adds the sft term"),
    (dict(loss_type=["hinge", "bco_pair"], label_smoothing=0.1), {}, ValueError,
     "label_smoothing must be 0"),
    (dict(loss_type=["aot", "sigmoid"], reduction="none"), {}, ValueError,
     "reduction must be 'mean' or 'sum' for a mix"),
    (dict(loss_type=["apo_zero", "sigmoid"], f_divergence_type="js_divergence"), {},
     ValueError, "f_divergence_type must be 'reverse_kl' for loss_type 'apo_zero'"),
    (dict(loss_type="aot"), {"weights"}, ValueError, "weights must be None for loss_type"),
    (dict(loss_type="sft"), set(), ValueError, "chosen_lengths is required for loss_type"),
    (dict(loss_type="sft"), {"chosen_lengths", "rejected_lengths"}, ValueError,
     "rejected_lengths must be None"),
    (dict(loss_type="sigmoid"), {"sft_logps"}, ValueError, "sft_logps must be None"),
    (dict(loss_type=[]), {}, ValueError, "loss_type must be one of"),
    (dict(loss_type=["sigmoid", "simpo"]), {}, ValueError, "got 'simpo'"),
    (dict(loss_type=("sigmoid", 3)), {}, ValueError, "loss_type must be one of"),
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0, float("nan")]), {}, ValueError,
     "loss_weights must hold floats that are finite"),
    (dict(loss_type="sigmoid", loss_weights=0.5), {}, TypeError,
     "loss_weights must be a non-empty list of floats"),
    (dict(loss_type="sigmoid", rpo_alpha=-1.0), {}, ValueError, "rpo_alpha must be"),
])
def test_mix_options_are_checked(options, tensors, error, match):
    pairs = random_pairs(4, torch.float64, "ipo")
    kw = {k: pairs[k] for k in ("chosen_lengths", "rejected_lengths") if k in tensors}
    if "weights" in tensors:
        kw["weights"] = torch.ones(4, dtype=torch.float64)
    if "sft_logps" in tensors:
        kw["sft_logps"] = pairs["policy_chosen"]
    with pytest.raises(error, match=match):
        rlhf_fast.dpo_loss(*[pairs[k] for k in INPUTS], **kw, **options)


def test_reference_free_mix_needs_every_type_reference_free():
    pairs = random_pairs(4, torch.float64)
    lengths = torch.full((4,), 3)
    out = rlhf_fast.dpo_loss(pairs["policy_chosen"], pairs["policy_rejected"], None, None,
                             loss_type=["sigmoid", "sft"], chosen_lengths=lengths)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="required for loss_type 'bco_pair'"):
        rlhf_fast.dpo_loss(pairs["policy_chosen"], pairs["policy_rejected"], None, None,
                           loss_type=["sigmoid", "bco_pair"])
