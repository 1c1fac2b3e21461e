"""rlhf_fast.linear_dpo_loss: the composition linear_logprobs + sequence_logps + dpo_loss
from hidden states (through the interpreter) against its parts and the reference."""

import pytest
import torch

import rlhf_fast
from helpers import leaves, random_linear_case, rel_err
from rlhf_fast import reference, types

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def dpo_case(pairs=3, steps=7, dim=16, vocab=101):
    hidden, weight, bias, _ = random_linear_case((2 * pairs, steps), dim, vocab, F64)
    labels = torch.randint(0, vocab, (2 * pairs, steps))
    mask = torch.rand(2 * pairs, steps) < 0.7
    mask[:, 0] = False  # a prompt token
    mask[:, -1] = True  # at least one answer token per sequence
    labels[~mask & (torch.rand(2 * pairs, steps) < 0.5)] = -100
    ref_chosen = -10 * torch.rand(pairs, dtype=F64)
    ref_rejected = -10 * torch.rand(pairs, dtype=F64)
    return hidden, weight, bias, labels, mask, ref_chosen, ref_rejected


def dpo_by_hand(ops, hidden, weight, labels, mask, ref_chosen, ref_rejected, *, bias,
                temperature, loss_type, **kw):
    """`ops`.linear_logprobs + sequence_logps + dpo_loss, as the docstring composes them."""
    token_logp = ops.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature)
    seq = ops.sequence_logps(token_logp, mask)
    pairs = hidden.shape[0] // 2
    if loss_type in types.DPO_LENGTH_NORMALISED_TYPES:
        lengths = (mask != 0).sum(-1)
        kw.update(chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:])
    return ops.dpo_loss(seq[:pairs], seq[pairs:], ref_chosen, ref_rejected, loss_type=loss_type,
                        **kw)


@pytest.mark.parametrize(
    "loss_type, reduction, with_ref",
    [("sigmoid", "mean", True), ("sigmoid", "none", True), ("sigmoid", "mean", False),
     ("ipo", "mean", True), ("ipo", "none", True), ("sigmoid_norm", "sum", True),
     ("hinge", "mean", True), ("robust", "none", False)],
)

def test_linear_dpo_loss_is_the_composition(loss_type, reduction, with_ref):
    hidden, weight, bias, labels, mask, ref_c, ref_r = dpo_case()
    if not with_ref:
        ref_c = ref_r = None
    if loss_type == "ipo":
        mask = mask.long()  # a 0/1 mask as well as a bool one
    kw = dict(temperature=0.9, beta=0.2, loss_type=loss_type, reduction=reduction,
              label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0)
    g = torch.randn(3, dtype=F64) if reduction == "none" else torch.tensor(1.7, dtype=F64)
    results = []
    for fn in (
        rlhf_fast.linear_dpo_loss,
        lambda *args, **kw: dpo_by_hand(rlhf_fast, *args, **kw),
        lambda *args, **kw: dpo_by_hand(reference, *args, **kw),
    ):
        h, w, b = leaves(hidden, weight, bias)
        out = fn(h, w, labels, mask, ref_c, ref_r, bias=b, **kw)
        assert out.loss.shape == g.shape
        (out.loss * g).sum().backward()
        results.append([*out, h.grad, w.grad, b.grad])
    fused, composed, ref = results
    names = (*types.DPOLossOutput._fields, "d_hidden", "d_weight", "d_bias")
    for name, a, b, c in zip(names, fused, composed, ref):
        assert a.shape == c.shape, name
        assert rel_err(a, b) < 1e-12, f"{name}: fused vs composed ops"
        assert rel_err(a, c) < TOL[F64], f"{name}: fused vs reference"
    assert (fused[5][mask == 0] == 0).all()  # no gradient into prompt / padding positions


@pytest.mark.parametrize("shape", [(3, 4, 8), (4, 8), (1, 4, 8), (0, 4, 8)])
def test_linear_dpo_loss_needs_stacked_pairs(shape):
    hidden = torch.randn(*shape)
    labels = torch.zeros(shape[:-1], dtype=torch.long)
    with pytest.raises(ValueError, match="hidden_chosen_and_rejected must have shape"):
        rlhf_fast.linear_dpo_loss(hidden, torch.randn(11, 8), labels, labels != 0, None, None)


@pytest.mark.parametrize("change, match", [
    (dict(labels=torch.zeros(4, 4, dtype=torch.long)),
     r"^labels must have shape \[2B, T\] = \(4, 5\) \(hidden_chosen_and_rejected"
     r"\.shape\[:2\]\), got \(4, 4\)$"),
    (dict(labels=torch.zeros(4, 5)), "^labels must have dtype"),
    (dict(ref_chosen=torch.zeros(3)),
     r"^ref_chosen must have shape \[B\] = \(2,\) \(one per pair\), got \(3,\)$"),
    (dict(ref_rejected=torch.zeros(2, 1)), r"^ref_rejected must have shape \[B\] = \(2,\)"),
    (dict(weight=torch.randn(11, 7)),
     r"^weight must have shape \[V, D\] with V >= 1 and D = "
     r"hidden_chosen_and_rejected\.shape\[-1\] = 8, got \(11, 7\)$"),
    (dict(hidden_chosen_and_rejected=torch.zeros(4, 5, 8, dtype=torch.long)),
     "^hidden_chosen_and_rejected must have dtype"),
    # another device (meta tensors exist without a GPU)
    (dict(mask=torch.ones(4, 5, device="meta")),
     "^mask must be on hidden_chosen_and_rejected's device cpu, got meta$"),
])

def test_linear_dpo_loss_errors_name_its_own_arguments(change, match):
    args = dict(hidden_chosen_and_rejected=torch.randn(4, 5, 8), weight=torch.randn(11, 8),
                labels=torch.zeros(4, 5, dtype=torch.long), mask=torch.ones(4, 5),
                ref_chosen=torch.zeros(2), ref_rejected=torch.zeros(2))
    args.update(change)
    error = TypeError if "dtype" in match else ValueError
    with pytest.raises(error, match=match):
        rlhf_fast.linear_dpo_loss(**args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_dpo_loss_masked_out_of_range_labels_are_not_read(monkeypatch, backend):
    """Labels outside the mask are never read: out of range there, they are accepted and
    give the result of an in-range label; at a token the mask keeps, they raise."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    hidden, weight, bias, labels, mask, ref_c, ref_r = dpo_case()
    labels[~mask] = 3
    wild = labels.clone()
    wild[~mask] = 10**6
    wild[0, 0] = -7
    results = []
    for lab in (labels, wild):
        h, w, b = leaves(hidden, weight, bias)
        out = rlhf_fast.linear_dpo_loss(h, w, lab, mask, ref_c, ref_r, bias=b)
        out.loss.backward()
        results.append([*out, h.grad, w.grad, b.grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    wild[mask.nonzero()[0].tolist()] = 101
    with pytest.raises(ValueError, match=r"^labels must be in \[0, 101\).*found 101"):
        rlhf_fast.linear_dpo_loss(hidden, weight, wild, mask, ref_c, ref_r, bias=bias)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_dpo_loss_ignore_index_outside_int32(monkeypatch, backend):
    """int32 labels and ignore_index = 5 + 2**32 (see test_linear_logprobs): the masking of
    linear_dpo_loss accepts it, and a label 5 is not ignored."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    hidden, weight, bias, labels, mask, ref_c, ref_r = dpo_case(vocab=11)
    labels[labels == -100] = 5
    results = []
    for lab, ignore_index in ((labels.int(), 5 + 2**32), (labels, -100)):
        h, w, b = leaves(hidden, weight, bias)
        out = rlhf_fast.linear_dpo_loss(h, w, lab, mask, ref_c, ref_r, bias=b,
                                        ignore_index=ignore_index)
        out.loss.backward()
        results.append([*out, h.grad, w.grad, b.grad])
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("options", [
    dict(ld_alpha=0.5, use_weighting=True, rpo_alpha=0.3),
    dict(loss_type=["sigmoid_norm", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.0),
    dict(loss_type=["ipo", "bco_pair"], use_weighting=True, reduction="none"),
])
def test_token_options_are_pair_logps_then_dpo_loss(options):
    """LD-DPO, WPO and the sft term from hidden states: the float64 reference's
    linear_logprobs (with log sum p^2) + pair_logps + dpo_loss."""
    hidden, weight, bias, labels, mask, ref_c, ref_r = dpo_case()
    g = torch.randn(3, dtype=F64) if options.get("reduction") == "none" else torch.tensor(
        1.3, dtype=F64)
    results = []
    for backend in ("fused", "reference"):
        h, w, b = leaves(hidden, weight, bias)
        if backend == "fused":
            out = rlhf_fast.linear_dpo_loss(h, w, labels, mask, ref_c, ref_r, bias=b,
                                            beta=0.2, **options)
        else:
            dpo_options = {k: v for k, v in options.items()
                           if k not in ("ld_alpha", "use_weighting")}
            logp, log_sum_p2 = reference.linear_logprobs(
                h, w, labels.masked_fill(~mask, -100), bias=b, return_sum_p2=True)
            pair = reference.pair_logps(
                logp, mask, ld_alpha=options.get("ld_alpha"),
                log_sum_p2=log_sum_p2 if options.get("use_weighting") else None)
            kinds = options.get("loss_type", "sigmoid")
            sft = "sft" in kinds or "rpo_alpha" in options
            out = reference.dpo_loss(
                pair.chosen, pair.rejected, ref_c, ref_r, beta=0.2, weights=pair.weights,
                chosen_lengths=pair.chosen_lengths if sft or "ipo" in kinds
                or "sigmoid_norm" in kinds else None,
                rejected_lengths=pair.rejected_lengths if "ipo" in kinds
                or "sigmoid_norm" in kinds else None,
                sft_logps=pair.sft_logps if sft else None, **dpo_options)
        (out.loss * g).sum().backward()
        results.append([*out, h.grad, w.grad, b.grad])
    names = (*types.DPOLossOutput._fields, "d_hidden", "d_weight", "d_bias")
    for name, a, b in zip(names, *results):
        assert rel_err(a, b) < TOL[F64], name


def test_token_options_are_checked_naming_them():
    hidden, weight, bias, labels, mask, ref_c, ref_r = dpo_case()
    with pytest.raises(ValueError, match="ld_alpha must be in"):
        rlhf_fast.linear_dpo_loss(hidden, weight, labels, mask, ref_c, ref_r, ld_alpha=2.0)
    with pytest.raises(TypeError, match="use_weighting must be a bool"):
        rlhf_fast.linear_dpo_loss(hidden, weight, labels, mask, ref_c, ref_r, use_weighting=1)
    with pytest.raises(TypeError, match="unexpected option 'ld_alfa'"):
        rlhf_fast.linear_dpo_loss(hidden, weight, labels, mask, ref_c, ref_r, ld_alfa=0.5)
