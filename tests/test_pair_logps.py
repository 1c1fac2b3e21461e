"""rlhf_fast.pair_logps: the fused path (sequence_logps' kernels through the interpreter)
against the reference in float64, and the reference against TRL's LD-DPO and WPO code
forms and a hand-computed case."""

import pytest
import torch

import rlhf_fast
from helpers import rel_err
from rlhf_fast import reference

F64 = torch.float64
FIELDS = ("chosen", "rejected", "chosen_lengths", "rejected_lengths", "sft_logps", "weights")


def pair_case(pairs=4, steps=9, dtype=F64):
    """Token log-probs of a stacked pair batch, an answer mask (a prompt, then an answer
    of random length, then padding; one empty answer), and log sum p^2 <= log p-ish."""
    token_logp = (-3 * torch.rand(2 * pairs, steps, dtype=F64)).to(dtype)
    start = torch.randint(0, 3, (2 * pairs, 1))
    length = torch.randint(1, steps - 2, (2 * pairs, 1))
    position = torch.arange(steps)
    mask = (position >= start) & (position < start + length)
    mask[1] = False  # an empty chosen answer: its pair shares nothing
    log_sum_p2 = -torch.rand(2 * pairs, steps, dtype=F64)
    return token_logp, mask, log_sum_p2


def trl_pair_logps(logits, labels, mask, ld_alpha):
    """TRL DPOTrainer's LD-DPO sums and WPO weights, written as its code computes them
    from the logits (comp_pos / shared_mask / tail_mask; lse2 - 2 lse1)."""
    per_token = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    per_token = per_token.masked_fill(~mask, 0.0)
    comp_pos = mask.long().cumsum(1)
    comp_lens = mask.sum(1)
    chosen_lens, rejected_lens = comp_lens.chunk(2)
    shared = torch.minimum(chosen_lens, rejected_lens).repeat(2)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared[:, None])
    tail_mask = comp_pos > shared[:, None]
    logps = (per_token * shared_mask).sum(1) + ld_alpha * (per_token * tail_mask).sum(1)
    log_denom = torch.logsumexp(2.0 * logits, -1) - 2.0 * torch.logsumexp(logits, -1)
    mean = ((per_token - log_denom) * mask).sum(1) / comp_lens.clamp_min(1)
    weights = torch.exp(mean)
    return logps, weights[: len(weights) // 2] * weights[len(weights) // 2:]


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_reference_equals_trl_code_forms(ld_alpha):
    token_logp, mask, _ = pair_case()
    logits = torch.randn(*mask.shape, 11, dtype=F64) * 2
    labels = torch.randint(0, 11, mask.shape)
    logp, log_sum_p2 = rlhf_fast.logprobs(logits, labels, return_sum_p2=True)
    got = reference.pair_logps(logp, mask, ld_alpha=ld_alpha, log_sum_p2=log_sum_p2)
    logps, weights = trl_pair_logps(logits, labels, mask, ld_alpha)
    assert rel_err(torch.cat([got.chosen, got.rejected]), logps) < 1e-12
    assert rel_err(got.weights, weights) < 1e-12
    assert rel_err(got.sft_logps, (logp * mask)[:4].sum(-1)) < 1e-12


def test_hand_computed_case():
    """Pair 0: chosen 3 tokens, rejected 2 (shared 2): the chosen's third at alpha. Pair
    1: chosen 1 token, rejected 3 after a prompt token (shared 1)."""
    token_logp = torch.tensor([[-1.0, -2.0, -4.0, -8.0],
                               [-0.5, -1.5, -9.0, -9.0],
                               [-3.0, -5.0, -7.0, -7.0],
                               [-9.0, -0.25, -0.75, -1.25]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1]])
    log_sum_p2 = torch.full((4, 4), -0.5, dtype=F64)
    out = reference.pair_logps(token_logp, mask, ld_alpha=0.5, log_sum_p2=log_sum_p2)
    assert out.chosen.tolist() == [-1 - 2 + 0.5 * -4, -0.5]
    assert out.rejected.tolist() == [-3 - 5, -0.25 + 0.5 * (-0.75 - 1.25)]
    assert out.sft_logps.tolist() == [-7.0, -0.5]
    assert out.chosen_lengths.tolist() == [3, 1] and out.rejected_lengths.tolist() == [2, 3]
    # answer weights exp(mean(logp) + 0.5): pair 0 exp(-7/3 + .5) exp(-4 + .5)
    expected = torch.tensor([(-7 / 3 + 0.5) + (-4 + 0.5), (-0.5 + 0.5) + (-0.75 + 0.5)],
                            dtype=F64).exp()
    assert rel_err(out.weights, expected) < 1e-15


def run(fn, token_logp, mask, upstream, **kw):
    leaf = token_logp.clone().requires_grad_()
    out = fn(leaf, mask, **kw)
    loss = sum((getattr(out, k) * g).sum() for k, g in upstream.items()
               if getattr(out, k) is not None)
    loss.backward()
    return out, leaf.grad


@pytest.mark.parametrize("ld_alpha", [None, 0.0, 0.4, 1.0])
@pytest.mark.parametrize("weighting", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_fused_matches_reference(ld_alpha, weighting, dtype):
    token_logp, mask, log_sum_p2 = pair_case(dtype=dtype)
    kw = dict(ld_alpha=ld_alpha, log_sum_p2=log_sum_p2 if weighting else None)
    upstream = {k: torch.randn(4, dtype=F64) for k in ("chosen", "rejected", "sft_logps")}
    out, grad = run(rlhf_fast.pair_logps, token_logp, mask, upstream, **kw)
    ref, ref_grad = run(reference.pair_logps, token_logp.double(), mask, upstream, **kw)
    tol = 1e-12 if dtype == F64 else 1e-5
    assert (out.sft_logps is None) == (ld_alpha is None)
    assert (out.weights is None) == (not weighting)
    for name in FIELDS:
        a, b = getattr(out, name), getattr(ref, name)
        if b is None:
            continue
        assert a.dtype == (F64 if dtype == F64 else torch.float32), name
        assert rel_err(a, b) < tol, name
    assert out.weights is None or not out.weights.requires_grad
    assert grad.dtype == dtype
    # rounded to the input's dtype (bf16: one ulp, 2^-7 relative: the interpreter's
    # fp32 -> bf16 casts truncate)
    assert rel_err(grad, ref_grad) < {F64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert (grad[mask == 0] == 0).all()


def test_ld_alpha_one_is_the_plain_sums_and_none_adds_nothing():
    token_logp, mask, _ = pair_case()
    plain = rlhf_fast.pair_logps(token_logp, mask)
    one = rlhf_fast.pair_logps(token_logp, mask, ld_alpha=1.0)
    assert plain.sft_logps is None and plain.weights is None
    assert torch.equal(one.chosen, plain.chosen) and torch.equal(one.rejected, plain.rejected)
    assert torch.equal(one.sft_logps, plain.chosen)
    assert torch.equal(plain.chosen, rlhf_fast.sequence_logps(token_logp[:4], mask[:4]))


def test_masked_entries_are_never_read():
    token_logp, mask, log_sum_p2 = pair_case()
    poisoned = token_logp.masked_fill(mask == 0, float("nan"))
    sums = log_sum_p2.masked_fill(mask == 0, float("inf"))
    upstream = {k: torch.randn(4, dtype=F64) for k in ("chosen", "rejected", "sft_logps")}
    out, grad = run(rlhf_fast.pair_logps, poisoned, mask, upstream, ld_alpha=0.5,
                    log_sum_p2=sums)
    clean, clean_grad = run(rlhf_fast.pair_logps, token_logp, mask, upstream, ld_alpha=0.5,
                            log_sum_p2=log_sum_p2)
    for name in FIELDS:
        assert torch.equal(getattr(out, name), getattr(clean, name)), name
    assert torch.equal(grad, clean_grad)


@pytest.mark.parametrize("case, error, match", [
    (dict(token_logp=torch.zeros(3, 4)), ValueError, r"token_logp must have shape \[2B, T\]"),
    (dict(token_logp=torch.zeros(2, 2, 4), mask=torch.ones(2, 2, 4)), ValueError,
     r"token_logp must have shape \[2B, T\]"),
    (dict(token_logp=torch.zeros(0, 4), mask=torch.ones(0, 4)), ValueError, "B >= 1"),
    (dict(mask=torch.ones(4, 5)), ValueError, "mask"),
    (dict(log_sum_p2=torch.zeros(4, 5)), ValueError, "log_sum_p2"),
    (dict(token_logp=torch.zeros(4, 4, dtype=torch.long)), TypeError, "token_logp"),
    (dict(ld_alpha=1.5), ValueError, r"ld_alpha must be in \[0, 1\]"),
    (dict(ld_alpha=float("nan")), ValueError, "ld_alpha"),
])
def test_bad_inputs_raise_clear_errors(case, error, match):
    args = dict(token_logp=torch.zeros(4, 4), mask=torch.ones(4, 4), log_sum_p2=None) | case
    with pytest.raises(error, match=match):
        rlhf_fast.pair_logps(args.pop("token_logp"), args.pop("mask"), **args)
