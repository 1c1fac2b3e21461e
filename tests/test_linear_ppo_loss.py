"""linear_ppo_loss: the PPO loss from hidden states, its gradient computed in the forward.

It must equal composing linear_logprobs (with entropy) and ppo_loss, in value and in every
gradient, whatever the chunking; and both must equal the float64 reference composition.
"""

import pytest
import torch
import torch.nn.functional as F

import rlhf_fast
from helpers import rel_err
from rlhf_fast import reference, types
from rlhf_fast.benchmarks import traffic
from rlhf_fast.kernels import linear_logprobs as linear_kernel

F64 = torch.float64


def make_case(B=3, T=9, D=16, V=211, dtype=F64, seed_mask=True):
    hidden = torch.randn(B, T, D, dtype=dtype)
    weight = (0.3 * torch.randn(V, D)).to(dtype)
    bias = torch.randn(V).to(dtype)
    labels = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3
    mask[1] = False  # an all-masked row
    mask[2, :3] = False  # left padding
    mask[2, 3:] = True
    labels[~mask] = -100
    old_logp = -5 + 0.1 * torch.randn(B, T, dtype=F64)
    ppo = dict(
        old_logp=old_logp,
        advantages=torch.randn(B, T, dtype=F64),
        mask=mask,
        ref_logp=-5 + 0.1 * torch.randn(B, T, dtype=F64),
        values=torch.randn(B, T, dtype=F64),
        old_values=torch.randn(B, T, dtype=F64),
        returns=torch.randn(B, T, dtype=F64),
    )
    return hidden, weight, bias, labels, ppo


OPTIONS = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.05,
               kl_estimator="k3", entropy_coef=0.01, value_clip=0.2, vf_coef=0.5,
               temperature=0.8)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def fused(hidden, weight, bias, labels, ppo, **options):
    return rlhf_fast.linear_ppo_loss(
        hidden, weight, labels, ppo["old_logp"], ppo["advantages"], ppo["mask"], bias=bias,
        ref_logp=ppo["ref_logp"], values=ppo["values_leaf"], old_values=ppo["old_values"],
        returns=ppo["returns"], **options,
    )


def composed(module, hidden, weight, bias, labels, ppo, *, temperature, **options):
    logp, entropy = module.linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True
    )
    return module.ppo_loss(
        logp, ppo["old_logp"], ppo["advantages"], ppo["mask"], ref_logp=ppo["ref_logp"],
        entropy=entropy, values=ppo["values_leaf"], old_values=ppo["old_values"],
        returns=ppo["returns"], **options,
    )


def run(fn, hidden, weight, bias, labels, ppo, upstream, **options):
    h, w, b, v = leaves(hidden, weight, bias, ppo["values"])
    out = fn(h, w, b, labels, {**ppo, "values_leaf": v}, **options)
    grads = torch.autograd.grad(out.loss * upstream, (h, w, b, v))
    return out, grads


def assert_matches_the_reference_composition(case, upstream, options):
    """The fused loss from hidden states equals the float64 reference's linear_logprobs
    then ppo_loss, in every output and gradient."""
    out, grads = run(fused, *case, upstream, **options)
    ref, ref_grads = run(lambda *a, **k: composed(reference, *a, **k), *case, upstream,
                         **options)
    for name, got, exact in zip(out._fields, out, ref):
        assert torch.allclose(got, exact, rtol=1e-10, atol=1e-12), name
    for got, exact in zip(grads, ref_grads):
        assert rel_err(got, exact) < 1e-10


@pytest.mark.parametrize("agg", types.AGG_MODES)
@pytest.mark.parametrize("chunk", [1 << 27, 500])
def test_equals_linear_logprobs_then_ppo_loss(agg, chunk, monkeypatch):
    monkeypatch.setattr(linear_kernel, "CHUNK_ELEMENTS", chunk)
    case = make_case()
    upstream = 1.0 + torch.rand((), dtype=F64)
    options = dict(OPTIONS, agg=agg)
    out, grads = run(fused, *case, upstream, **options)
    want, want_grads = run(lambda *a, **k: composed(rlhf_fast, *a, **k), *case, upstream,
                           **options)
    ref, ref_grads = run(lambda *a, **k: composed(reference, *a, **k), *case, upstream,
                         **options)
    for name, got, expected, exact in zip(out._fields, out, want, ref):
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14), name
        assert torch.allclose(got, exact, rtol=1e-10, atol=1e-12), name
    for got, expected, exact in zip(grads, want_grads, ref_grads):
        assert rel_err(got, expected) < 1e-12
        assert rel_err(got, exact) < 1e-10


@pytest.mark.parametrize("policy_loss", types.POLICY_LOSSES)
def test_policy_losses_on_the_fused_path(policy_loss):
    """Every policy loss from hidden states (the sequence ones through linear_logprobs +
    ppo_loss), against the reference composition."""
    case = make_case()
    upstream = 1.0 + torch.rand((), dtype=F64)
    options = dict(OPTIONS, policy_loss=policy_loss,
                   dual_clip=OPTIONS["dual_clip"] if policy_loss == "vanilla" else None)
    if policy_loss == "clip_cov":  # its draws are random: none in range here
        options |= dict(clip_cov_lb=1e30, clip_cov_ub=2e30)
    assert_matches_the_reference_composition(case, upstream, options)


#: The losses that read every log-prob of a row or of the batch before a token's gradient
#: (linear_ppo_loss's docstring): linear_logprobs + ppo_loss, 4 GEMMs. The others: 3.
READ_LOGPROBS_FIRST = types.SEQUENCE_POLICY_LOSSES + ("bypass_mode", "clip_cov", "kl_cov")


@pytest.mark.parametrize("policy_loss", types.POLICY_LOSSES)
def test_each_policy_loss_takes_its_documented_path(policy_loss):
    """The fused path (3 GEMMs: the token gradients in the forward, per chunk, and a
    backward without a launch) for every token loss, dro included; linear_logprobs +
    ppo_loss (the backward recomputes the logits) for the others, with the row-mean pass
    for the sequence losses alone."""
    hidden, weight, bias, labels, ppo = make_case()
    h, w = leaves(hidden, weight)
    with traffic.counting() as forward:
        out = rlhf_fast.linear_ppo_loss(
            h, w, labels, ppo["old_logp"], ppo["advantages"], ppo["mask"], bias=bias,
            ref_logp=ppo["ref_logp"], **dict(OPTIONS, policy_loss=policy_loss,
                                             dual_clip=3.0 if policy_loss == "vanilla" else None))
    with traffic.counting() as backward:
        out.loss.backward()
    reduce = ["_ppo_fwd_kernel", "_ppo_reduce_kernel"]
    if policy_loss in READ_LOGPROBS_FIRST:
        first = ["_ppo_sequence_kernel"] if policy_loss in types.SEQUENCE_POLICY_LOSSES else []
        assert forward.launches == ["_logprobs_fwd_kernel", *first, *reduce]
        assert backward.launches == ["_ppo_bwd_kernel", "_logprobs_bwd_kernel"]
    else:  # one token chunk here
        assert forward.launches == ["_logprobs_fwd_kernel", "_ppo_token_grad_kernel",
                                    "_logprobs_bwd_kernel", *reduce]
        assert backward.launches == []


@pytest.mark.parametrize("threshold", ["2.0", "0.9_1.1"])  # truncated, masked IS
@pytest.mark.parametrize("policy_loss", ["vanilla", "gspo", "bypass_mode"])
def test_rollout_correction_on_the_fused_path(policy_loss, threshold):
    """IS weights and rejection sampling from hidden states: the decoupled correction on
    the 3-GEMM path, bypass_mode's (which reads every log-prob first) on linear_logprobs +
    ppo_loss; against the reference composition."""
    hidden, weight, bias, labels, ppo = make_case()
    rollout = None
    if policy_loss != "bypass_mode":
        rollout = ppo["old_logp"] + 0.2 * torch.randn(ppo["old_logp"].shape, dtype=F64)
        first = ppo["mask"].nonzero()[0]
        rollout[first[0], first[1]] += 1.0  # one token rejected at least, whatever the draw
    options = dict(OPTIONS, policy_loss=policy_loss, rollout_is="token",
                   rollout_is_threshold=threshold,
                   rollout_rs="token_k1", rollout_rs_threshold="0.8_1.25",
                   dual_clip=OPTIONS["dual_clip"] if policy_loss == "vanilla" else None)
    results = []
    for module in (rlhf_fast, reference):
        h, w = leaves(hidden, weight)
        if module is rlhf_fast:
            out = rlhf_fast.linear_ppo_loss(
                h, w, labels, ppo["old_logp"], ppo["advantages"], ppo["mask"], bias=bias,
                ref_logp=ppo["ref_logp"], rollout_logp=rollout, **options)
        else:
            ppo_options = {k: v for k, v in options.items() if k != "temperature"}
            logp, entropy = reference.linear_logprobs(
                h, w, labels, bias=bias, return_entropy=True, temperature=options["temperature"])
            out = reference.ppo_loss(logp, ppo["old_logp"], ppo["advantages"], ppo["mask"],
                                     ref_logp=ppo["ref_logp"], entropy=entropy,
                                     rollout_logp=rollout, **ppo_options)
        results.append((out, torch.autograd.grad(out.loss, (h, w))))
    (out, grads), (ref, ref_grads) = results
    assert ref.rollout_rs_masked_fraction > 0
    assert (ref.rollout_is_masked_fraction > 0) == ("_" in threshold)
    for name, got, exact in zip(out._fields, out, ref):
        assert torch.allclose(got, exact, rtol=1e-10, atol=1e-12), name
    for got, exact in zip(grads, ref_grads):
        assert rel_err(got, exact) < 1e-10


@pytest.mark.parametrize("trl", [dict(top_entropy_quantile=0.5),
                                 dict(off_policy_mask_threshold=0.0),
                                 dict(use_bias_correction_kl=True)])
def test_trl_options_on_the_fused_path(trl):
    case = make_case()
    upstream = 1.0 + torch.rand((), dtype=F64)
    options = dict(OPTIONS, **trl)
    assert_matches_the_reference_composition(case, upstream, options)


def test_global_counts_on_the_fused_path():
    case = make_case()
    upstream = 1.0 + torch.rand((), dtype=F64)
    for agg in types.AGG_MODES:
        options = dict(OPTIONS, agg=agg, batch_num_tokens=40, global_batch_size=7, dp_size=2)
        out, grads = run(fused, *case, upstream, **options)
        ref, ref_grads = run(lambda *a, **k: composed(reference, *a, **k), *case, upstream,
                             **options)
        assert torch.allclose(out.loss, ref.loss, rtol=1e-10, atol=1e-12), agg
        for got, exact in zip(grads, ref_grads):
            assert rel_err(got, exact) < 1e-10, agg


@pytest.mark.parametrize("kl_estimator", ["abs", "low_var_kl+"])
def test_kl_estimators_on_the_fused_path(kl_estimator):
    """Estimators beside k3 from hidden states, against the reference."""
    case = make_case()
    upstream = 1.0 + torch.rand((), dtype=F64)
    options = dict(OPTIONS, kl_estimator=kl_estimator)
    assert_matches_the_reference_composition(case, upstream, options)


def composed_on_rounded_logits(hidden, weight, bias, labels, ppo, *, temperature, **options):
    """The float64 reference on the logits the fused path computes: the lm_head's GEMM in
    the inputs' dtype (its rounding: a bf16 logit is 0.4% off the exact one, enough to flip
    a token across a clip bound, as a float64 GEMM's logits did by seed), then float64."""
    logits = F.linear(hidden, weight, bias).to(F64)
    logp, entropy = reference.logprobs(logits, labels, temperature=temperature,
                                       return_entropy=True)
    return reference.ppo_loss(
        logp, ppo["old_logp"], ppo["advantages"], ppo["mask"], ref_logp=ppo["ref_logp"],
        entropy=entropy, values=ppo["values_leaf"], old_values=ppo["old_values"],
        returns=ppo["returns"], **options,
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_against_the_float64_reference(dtype, tol):
    hidden, weight, bias, labels, ppo = make_case(dtype=dtype)
    upstream = torch.tensor(1.0, dtype=F64)
    out, grads = run(fused, hidden, weight, bias, labels, ppo, upstream, **OPTIONS)
    ref, ref_grads = run(composed_on_rounded_logits, hidden, weight, bias, labels, ppo,
                         upstream, **OPTIONS)
    assert out.loss.dtype == torch.float32
    assert rel_err(out.loss, ref.loss) < tol
    for got, expected, like in zip(grads, ref_grads, (hidden, weight, bias, ppo["values"])):
        assert got.dtype == like.dtype
        assert rel_err(got, expected) < tol


def test_frozen_weight_and_frozen_hidden():
    hidden, weight, bias, labels, ppo = make_case()
    h = hidden.clone().requires_grad_()
    out = rlhf_fast.linear_ppo_loss(h, weight, labels, ppo["old_logp"], ppo["advantages"],
                                    ppo["mask"], **{k: v for k, v in OPTIONS.items()
                                                    if k not in ("kl_coef",)})
    (d_hidden,) = torch.autograd.grad(out.loss, (h,))
    h2, w2 = leaves(hidden, weight)
    want = composed(rlhf_fast, h2, w2.detach(), None, labels,
                    {**ppo, "ref_logp": None, "values_leaf": None, "old_values": None,
                     "returns": None},
                    **{k: v for k, v in OPTIONS.items() if k not in ("kl_coef",)})
    (want_hidden,) = torch.autograd.grad(want.loss, (h2,))
    assert rel_err(d_hidden, want_hidden) < 1e-12
    w = weight.clone().requires_grad_()
    out = rlhf_fast.linear_ppo_loss(hidden, w, labels, ppo["old_logp"], ppo["advantages"],
                                    ppo["mask"])
    (d_weight,) = torch.autograd.grad(out.loss, (w,))
    w2 = weight.clone().requires_grad_()
    want = composed(rlhf_fast, hidden, w2, None, labels,
                    {**ppo, "ref_logp": None, "values_leaf": None, "old_values": None,
                     "returns": None}, temperature=1.0)
    (want_weight,) = torch.autograd.grad(want.loss, (w2,))
    assert d_weight.dtype == weight.dtype and want_weight.abs().sum() > 0
    assert rel_err(d_weight, want_weight) < 1e-12


def test_fp16_loss_scaling_matches_the_composition():
    """GradScaler's first scale, 65536, is inf in fp16: the upstream gradient must meet
    the saved gradients in fp32, where the product stays finite (as the composition's)."""
    hidden, weight, bias, labels, ppo = make_case(dtype=torch.float16)
    hidden, bias = hidden * 0.05, bias * 0.1  # gradients < 0.5: finite at this scale
    scale = torch.tensor(65536.0)
    out, grads = run(fused, hidden, weight, bias, labels, ppo, scale, **OPTIONS)
    want, want_grads = run(lambda *a, **k: composed(rlhf_fast, *a, **k), hidden, weight,
                           bias, labels, ppo, scale, **OPTIONS)
    assert rel_err(out.loss, want.loss) < 1e-3
    for got, expected in zip(grads, want_grads):
        assert torch.isfinite(got).all() and torch.isfinite(expected).all()
        assert rel_err(got, expected) < 1e-2


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_without_grad_mode_the_gradient_gemms_are_skipped(mode, monkeypatch):
    """Evaluation passes pay for the logits GEMM only, with the same outputs."""
    hidden, weight, bias, labels, ppo = make_case()
    ppo["values_leaf"] = ppo["values"]
    h, w, b = leaves(hidden, weight, bias)
    want = fused(h, w, b, labels, ppo, **OPTIONS)
    gemms = []
    for name in ("product_into", "add_product"):
        real = getattr(linear_kernel, name)
        monkeypatch.setattr(linear_kernel, name,
                            lambda *a, real=real, name=name: gemms.append(name) or real(*a))
    with mode():
        out = fused(h, w, b, labels, ppo, **OPTIONS)
    assert gemms == []
    assert not out.loss.requires_grad
    assert all(torch.equal(a.detach(), b) for a, b in zip(want, out))


def test_statistics_are_detached_and_only_loss_differentiates():
    hidden, weight, bias, labels, ppo = make_case()
    h = hidden.clone().requires_grad_()
    out = rlhf_fast.linear_ppo_loss(h, weight, labels, ppo["old_logp"], ppo["advantages"],
                                    ppo["mask"], entropy_coef=0.01)
    assert out.loss.requires_grad
    assert not any(field.requires_grad for field in out[1:])


def test_all_masked_batch_gives_zero_loss_and_zero_gradients():
    hidden, weight, bias, labels, ppo = make_case()
    mask = torch.zeros_like(ppo["mask"])
    h, w = leaves(hidden, weight)
    out = rlhf_fast.linear_ppo_loss(h, w, labels, ppo["old_logp"], ppo["advantages"], mask,
                                    entropy_coef=0.01)
    d_hidden, d_weight = torch.autograd.grad(out.loss, (h, w))
    assert all(float(field.detach()) == 0 for field in out)
    assert not d_hidden.any() and not d_weight.any()


def test_nan_under_the_mask_does_not_leak():
    hidden, weight, bias, labels, ppo = make_case()
    ppo["old_logp"][~ppo["mask"]] = float("nan")
    ppo["advantages"][~ppo["mask"]] = float("nan")
    out, grads = run(fused, hidden, weight, bias, labels, ppo, torch.tensor(1.0, dtype=F64),
                     **OPTIONS)
    assert all(torch.isfinite(field) for field in out)
    assert all(torch.isfinite(g).all() for g in grads)


def test_torch_backend_runs_the_reference(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    case = make_case()
    upstream = torch.tensor(1.0, dtype=F64)
    out, grads = run(fused, *case, upstream, **OPTIONS)
    ref, ref_grads = run(lambda *a, **k: composed(reference, *a, **k), *case, upstream,
                         **OPTIONS)
    assert torch.equal(out.loss, ref.loss)
    assert not any(field.requires_grad for field in out[1:])
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_out_of_range_labels_are_not_read(monkeypatch, backend):
    """Labels outside the mask are never read, so not range-checked either: [[3, 99]] with
    mask [[1, 0]] (V < 99) raised on the CPU. Out of range there they give the result of an
    in-range label; at a token the mask keeps they raise, naming labels."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    hidden, weight, bias, labels, ppo = make_case()
    mask = ppo["mask"]
    labels[~mask] = 3
    wild = labels.clone()
    wild[~mask] = 10**6
    wild[1, 0] = -7
    upstream = torch.tensor(1.0, dtype=F64)
    out, grads = run(fused, hidden, weight, bias, labels, ppo, upstream, **OPTIONS)
    wild_out, wild_grads = run(fused, hidden, weight, bias, wild, ppo, upstream, **OPTIONS)
    assert all(torch.equal(a, b) for a, b in zip(out, wild_out))
    assert all(torch.equal(a, b) for a, b in zip(grads, wild_grads))
    wild[tuple(mask.nonzero()[0].tolist())] = 211
    with pytest.raises(ValueError, match=r"^labels must be in \[0, 211\).*found 211"):
        run(fused, hidden, weight, bias, wild, ppo, upstream, **OPTIONS)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(hidden=torch.randn(27, 16, dtype=F64)), ValueError, "hidden must have shape"),
        (dict(hidden=[[[1.0]]]), TypeError, "hidden must be a torch.Tensor"),
        (dict(hidden=torch.ones(3, 9, 16, dtype=torch.long)), TypeError, "hidden must have dtype"),
        (dict(clip_ep=0.3), TypeError, "unexpected option 'clip_ep'"),
        (dict(old_logp=torch.randn(3, 8, dtype=F64)), ValueError, "old_logp must have"),
        (dict(mask=torch.ones(3, 9, dtype=torch.complex64)), TypeError, "mask must have"),
        (dict(kl_coef=0.1), ValueError, "ref_logp is required"),
        (dict(agg="mean"), ValueError, "agg must be one of"),
        (dict(weight=torch.randn(211, 15, dtype=F64)), ValueError, "weight must have shape"),
        (dict(temperature=0.0), ValueError, "temperature"),
    ],
)
def test_bad_input_raises_naming_the_argument(change, error, match):
    hidden, weight, bias, labels, ppo = make_case()
    args = dict(hidden=hidden, weight=weight, labels=labels, old_logp=ppo["old_logp"],
                advantages=ppo["advantages"], mask=ppo["mask"])
    args.update(change)
    positional = [args.pop(k) for k in ("hidden", "weight", "labels", "old_logp",
                                        "advantages", "mask")]
    with pytest.raises(error, match=match):
        rlhf_fast.linear_ppo_loss(*positional, **args)
