"""rlhf_fast.logprobs: the Triton kernels (through the interpreter) against the reference."""

import math

import pytest
import torch

import rlhf_fast
from helpers import rel_err
from rlhf_fast import reference
from rlhf_fast.kernels import logprobs as kernel

BLOCK = kernel.MAX_BLOCK_V
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def random_case(shape, vocab, dtype, scale=3.0, ignore_frac=0.2):
    logits = (torch.randn(*shape, vocab, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignore_frac] = -100
    return logits, labels


def run_both(logits, labels, *, temperature=1.0, inplace=False, **kw):
    """Kernel on `logits` and reference in float64 on the same (rounded) values, with random
    upstream gradients on all three outputs. Returns (kernel outs, reference outs), each
    (logp, entropy, log_sum_p2, grad)."""
    x = logits.clone().requires_grad_()
    x_ref = logits.detach().double().requires_grad_()
    if inplace:  # the in-place backward needs a non-leaf whose storage it may overwrite
        leaf = x
        x = leaf * 1
    outs = rlhf_fast.logprobs(x, labels, temperature=temperature, return_entropy=True,
                              return_sum_p2=True, inplace_backward=inplace, **kw)
    refs = reference.logprobs(x_ref, labels, temperature=temperature, return_entropy=True,
                              return_sum_p2=True)
    upstream = [torch.randn_like(ref) for ref in refs]
    sum(((out.double() * g).sum() for out, g in zip(outs, upstream))).backward()
    sum(((ref * g).sum() for ref, g in zip(refs, upstream))).backward()
    grad = leaf.grad if inplace else x.grad
    return (*outs, grad), (*refs, x_ref.grad)


def assert_close(outs, refs, dtype):
    names = ("logp", "entropy", "log_sum_p2", "grad")
    for name, out, ref in zip(names, outs, refs):
        err = rel_err(out, ref)
        assert err < TOL[dtype], f"{name}: relative error {err:.3g} >= {TOL[dtype]}"


# ----------------------------------------------------------------- reference vs hand math


def test_reference_matches_hand_formula():
    row = [1.0, 2.0, 3.0, -0.5]
    logits = torch.tensor([row, row], dtype=torch.float64)
    labels = torch.tensor([2, -100])
    logp, ent = reference.logprobs(logits, labels, temperature=2.0, return_entropy=True)
    z = [v / 2.0 for v in row]
    lse = math.log(sum(math.exp(v) for v in z))
    probs = [math.exp(v - lse) for v in z]
    assert logp[0].item() == pytest.approx(z[2] - lse, rel=1e-12)
    assert ent[0].item() == pytest.approx(-sum(p * math.log(p) for p in probs), rel=1e-12)
    assert logp[1].item() == 0.0 and ent[1].item() == 0.0


def test_reference_log_sum_p2_matches_hand_formula():
    """log sum_j p_j^2 by hand, and verl's sum_pi_squared formula (its exp):
    (softmax(z) ** 2).sum(-1); a uniform row gives log(1 / V)."""
    row = [1.0, 2.0, 3.0, -0.5]
    logits = torch.tensor([row, [0.7] * 4], dtype=torch.float64)
    log_sum_p2 = reference.logprobs(logits, torch.tensor([2, 0]), temperature=2.0,
                                    return_sum_p2=True)[1]
    z = [v / 2.0 for v in row]
    lse = math.log(sum(math.exp(v) for v in z))
    assert log_sum_p2[0].item() == pytest.approx(
        math.log(sum(math.exp(2 * (v - lse)) for v in z)), rel=1e-12)
    verl = (torch.softmax(logits / 2.0, -1) ** 2).sum(-1)
    torch.testing.assert_close(log_sum_p2.exp(), verl, rtol=1e-12, atol=0)
    assert log_sum_p2[1].item() == pytest.approx(math.log(1 / 4), rel=1e-12)


def test_reference_neg_inf_logit_has_zero_probability():
    logits = torch.tensor([[0.0, float("-inf"), 0.0]], dtype=torch.float64, requires_grad=True)
    logp, ent = reference.logprobs(logits, torch.tensor([0]), return_entropy=True)
    assert logp.item() == pytest.approx(-math.log(2))
    assert ent.item() == pytest.approx(math.log(2))
    (logp + ent).sum().backward()
    assert torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(dtype, temperature, poisoned_empty):
    logits, labels = random_case((3, 11), 1031, dtype)
    outs, refs = run_both(logits, labels, temperature=temperature)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert outs[0].dtype == outs[1].dtype == outs[2].dtype == out_dtype
    assert outs[3].dtype == dtype
    assert_close(outs, refs, dtype)


@pytest.mark.parametrize("n_rows", [0, 1, 13])
@pytest.mark.parametrize("vocab", [1, 2, 13, BLOCK - 1, BLOCK, BLOCK + 1])
def test_edge_shapes(n_rows, vocab, poisoned_empty):
    # float64 through the kernel: these cases test indexing and masking, and one row of
    # two tokens can cancel to a tiny gradient that fp32 rounding would dominate.
    logits, labels = random_case((n_rows,), vocab, torch.float64)
    outs, refs = run_both(logits, labels)
    assert outs[0].shape == outs[1].shape == outs[2].shape == (n_rows,)
    assert outs[3].shape == (n_rows, vocab)
    assert_close(outs, refs, torch.float64)


def test_largest_vocab():
    logits, labels = random_case((2,), 262144, torch.bfloat16, ignore_frac=0.0)
    outs, refs = run_both(logits, labels)
    assert_close(outs, refs, torch.bfloat16)


def test_row_offsets_past_two_to_the_31():
    """The last row of a [N, 151936] bf16 tensor starts past element 2^31: a 32-bit row
    offset (row and V both fit int32, their product does not) reads the wrong memory.
    Only that row is written (the rest of the 4.3 GB allocation is never touched) and
    only it is labelled, so the other rows are not read either."""
    vocab = 151936
    n_rows = 2**31 // vocab + 2
    logits = torch.empty(n_rows, vocab, dtype=torch.bfloat16)
    assert (n_rows - 1) * vocab > 2**31
    last = (torch.randn(vocab, dtype=torch.float64) * 3).to(torch.bfloat16)
    logits[-1] = last
    labels = torch.full((n_rows,), -100, dtype=torch.long)
    labels[-1] = int(torch.randint(0, vocab, ()))
    logp, ent = rlhf_fast.logprobs(logits, labels, return_entropy=True, check_labels=False)
    logp_ref, ent_ref = reference.logprobs(last[None].double(), labels[-1:], return_entropy=True)
    assert rel_err(logp[-1:], logp_ref) < 1e-5
    assert rel_err(ent[-1:], ent_ref) < 1e-5
    assert torch.count_nonzero(logp[:-1]) == 0


def test_any_leading_shape():
    logits, labels = random_case((2, 3, 4), 37, torch.float32)
    outs, refs = run_both(logits, labels)
    assert outs[0].shape == (2, 3, 4)
    assert_close(outs, refs, torch.float32)


def test_int32_labels():
    logits, labels = random_case((9,), 50, torch.float32)
    outs, refs = run_both(logits, labels.to(torch.int32))
    assert_close(outs, refs, torch.float32)


def test_gradcheck_float64():
    logits, labels = random_case((4,), 7, torch.float64)
    x = logits.requires_grad_()

    def all_three(x):
        return rlhf_fast.logprobs(x, labels, temperature=1.3, return_entropy=True,
                                  return_sum_p2=True)

    assert torch.autograd.gradcheck(all_three, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("returned", [("entropy",), ("sum_p2",), ()])
def test_each_combination_of_outputs(returned):
    """logp alone, or followed by the outputs asked for, in order; each one's gradient."""
    logits, labels = random_case((5,), 40, torch.float64)
    flags = dict(return_entropy="entropy" in returned, return_sum_p2="sum_p2" in returned)
    x, x_ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    outs = rlhf_fast.logprobs(x, labels, **flags)
    refs = reference.logprobs(x_ref, labels, **flags)
    if not returned:
        outs, refs = (outs,), (refs,)
    assert len(outs) == len(refs) == 1 + len(returned)
    upstream = [torch.randn_like(ref) for ref in refs]
    sum((out * g).sum() for out, g in zip(outs, upstream)).backward()
    sum((ref * g).sum() for ref, g in zip(refs, upstream)).backward()
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) < 1e-12
    assert rel_err(x.grad, x_ref.grad) < 1e-12


def test_gradient_from_one_output_only():
    logits, labels = random_case((6,), 40, torch.float32, ignore_frac=0.0)
    for pick in (0, 1):
        x = logits.clone().requires_grad_()
        x_ref = logits.double().requires_grad_()
        rlhf_fast.logprobs(x, labels, return_entropy=True)[pick].sum().backward()
        reference.logprobs(x_ref, labels, return_entropy=True)[pick].sum().backward()
        assert rel_err(x.grad, x_ref.grad) < 1e-5
    x = logits.clone().requires_grad_()
    x_ref = logits.double().requires_grad_()
    rlhf_fast.logprobs(x, labels).sum().backward()
    reference.logprobs(x_ref, labels).sum().backward()
    assert rel_err(x.grad, x_ref.grad) < 1e-5


# ----------------------------------------------------------------- ignore_index


def test_ignored_rows_give_zero_and_no_gradient():
    logits, labels = random_case((8,), 30, torch.float32, ignore_frac=0.0)
    labels[::2] = 7  # a custom ignore_index that is also a valid token id
    logits[0, 3] = float("nan")  # ignored rows are never read
    x = logits.clone().requires_grad_()
    logp, ent = rlhf_fast.logprobs(x, labels, ignore_index=7, return_entropy=True)
    (logp * torch.randn(8) + ent * torch.randn(8)).sum().backward()
    assert (logp[::2] == 0).all() and (ent[::2] == 0).all()
    assert (x.grad[::2] == 0).all()
    assert torch.isfinite(logp).all() and torch.isfinite(x.grad).all()
    ref = reference.logprobs(logits.double(), labels, ignore_index=7)
    assert rel_err(logp, ref) < 1e-5


def test_all_rows_ignored():
    logits, labels = random_case((5,), 20, torch.bfloat16)
    labels.fill_(-100)
    outs, refs = run_both(logits, labels)
    for out in outs:
        assert (out == 0).all()


# ----------------------------------------------------------------- views and in-place


def test_row_strided_view_is_read_without_copy():
    full, labels = random_case((3, 9), 70, torch.bfloat16)
    view = full[:, :-1]
    assert not view.is_contiguous() and kernel.row_layout(view) is not None
    outs, refs = run_both(view, labels[:, 1:])
    assert_close(outs, refs, torch.bfloat16)


def test_transposed_leading_dims():
    full, _ = random_case((4, 5), 33, torch.float32)
    view = full.transpose(0, 1)
    labels = torch.randint(0, 33, (5, 4))
    outs, refs = run_both(view, labels)
    assert_close(outs, refs, torch.float32)


def test_unmergeable_leading_dims_are_copied():
    full, _ = random_case((4, 4, 4), 17, torch.float32)
    view = full[::2, ::2, ::2]  # three leading dims no stride merge can flatten
    assert kernel.row_layout(view) is None
    labels = torch.randint(0, 17, view.shape[:-1])
    outs, refs = run_both(view, labels)
    assert_close(outs, refs, torch.float32)


@pytest.mark.parametrize("layout", ["strided", "expanded", "transposed"])
def test_labels_in_any_layout(layout):
    """The kernels index the labels by row: a view that reshape(-1) keeps a view (a column
    of a [N, 2] tensor, an expand(), a transpose) must be read as its values."""
    logits, _ = random_case((6,), 50, torch.float64)
    if layout == "strided":
        labels = torch.randint(0, 50, (6, 2))[:, 0]
    elif layout == "expanded":
        labels = torch.tensor([3]).expand(6)
        assert labels.reshape(-1).stride() == (0,)
    else:
        logits = logits.view(2, 3, 50)
        labels = torch.randint(0, 50, (3, 2)).t()
    assert not labels.is_contiguous()
    outs, refs = run_both(logits, labels)
    assert_close(outs, refs, torch.float64)


def test_empty_batch_with_unmergeable_leading_dims():
    """An empty tensor is "contiguous" whatever its strides, so the copy made for three
    unmergeable leading dims keeps them: the backward must still give an empty gradient."""
    leaf = torch.randn(1, 2, 0, 5, dtype=torch.float64, requires_grad=True)
    x = leaf.expand(2, 2, 0, 5)
    assert kernel.row_layout(x) is None and kernel.row_layout(x.contiguous()) is None
    logp, ent = rlhf_fast.logprobs(x, torch.zeros(2, 2, 0, dtype=torch.long),
                                   return_entropy=True)
    assert logp.shape == ent.shape == (2, 2, 0)
    (logp.sum() + ent.sum()).backward()
    assert leaf.grad.shape == leaf.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(dtype):
    logits, labels = random_case((4, 6), 301, dtype)
    outs, refs = run_both(logits, labels, inplace=True)
    assert_close(outs, refs, dtype)


def test_inplace_backward_writes_into_the_logits_storage():
    logits, labels = random_case((10,), 64, torch.float32)
    leaf = logits.clone().requires_grad_()
    x = leaf * 2
    seen = {}

    def record_storage(grad):
        seen["ptr"] = grad.untyped_storage().data_ptr()

    x.register_hook(record_storage)
    rlhf_fast.logprobs(x, labels, inplace_backward=True).sum().backward()
    assert seen["ptr"] == x.untyped_storage().data_ptr()


def test_inplace_backward_on_a_strided_view():
    full, labels = random_case((2, 7), 45, torch.float32)
    leaf = full.clone().requires_grad_()
    x_ref = full.double().requires_grad_()
    logp = rlhf_fast.logprobs((leaf * 1)[:, :-1], labels[:, 1:], inplace_backward=True)
    logp_ref = reference.logprobs(x_ref[:, :-1], labels[:, 1:])
    g = torch.randn_like(logp_ref)
    (logp.double() * g).sum().backward()
    (logp_ref * g).sum().backward()
    assert rel_err(leaf.grad, x_ref.grad) < 1e-5
    assert (leaf.grad[:, -1] == 0).all()


def test_last_dim_must_be_contiguous():
    logits = torch.randn(4, 10)[:, ::2]
    with pytest.raises(ValueError, match="logits.*stride 1"):
        rlhf_fast.logprobs(logits, torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_stay_finite(dtype):
    logits, labels = random_case((6,), 257, torch.float32, ignore_frac=0.0)
    logits = (logits.sign() * 1e4).to(dtype)
    logits[1] = torch.linspace(-1e4, 1e4, 257)
    logits[2] = -1e4
    outs, refs = run_both(logits, labels)
    for out in outs:
        assert torch.isfinite(out).all()
    assert_close(outs, refs, dtype)


def test_neg_inf_logits_are_zero_probability_tokens():
    logits, labels = random_case((5,), 100, torch.float32, ignore_frac=0.0)
    logits[:, 50:] = float("-inf")
    labels = labels % 50
    outs, refs = run_both(logits, labels)
    for out in outs:
        assert torch.isfinite(out).all()
    assert_close(outs, refs, torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_one_row_stays_in_that_row(bad):
    logits, labels = random_case((6,), 80, torch.float32, ignore_frac=0.0)
    clean_logp, clean_ent = rlhf_fast.logprobs(logits, labels, return_entropy=True)
    logits[2, 17] = bad
    x = logits.clone().requires_grad_()
    logp, ent = rlhf_fast.logprobs(x, labels, return_entropy=True)
    (logp + ent).sum().backward()
    others = [0, 1, 3, 4, 5]
    assert logp[2].isnan() and ent[2].isnan()
    assert torch.equal(logp[others], clean_logp[others])
    assert torch.equal(ent[others], clean_ent[others])
    assert torch.isfinite(x.grad[others]).all()


def test_out_of_range_label_unchecked_gives_nan_for_its_row_only():
    logits, labels = random_case((5,), 40, torch.float32, ignore_frac=0.0)
    labels[1], labels[3] = 40, -3
    x = logits.clone().requires_grad_()
    logp, ent, sum_p2 = rlhf_fast.logprobs(x, labels, return_entropy=True, return_sum_p2=True,
                                           check_labels=False)
    (logp + ent + sum_p2).sum().backward()
    assert logp[[1, 3]].isnan().all() and ent[[1, 3]].isnan().all()
    assert sum_p2[[1, 3]].isnan().all() and torch.isfinite(sum_p2[[0, 2, 4]]).all()
    assert x.grad[[1, 3]].isnan().all()
    ok = [0, 2, 4]
    ref_logp, ref_ent = reference.logprobs(logits.double(), labels, return_entropy=True)
    assert rel_err(logp[ok], ref_logp[ok]) < 1e-5 and rel_err(ent[ok], ref_ent[ok]) < 1e-5
    assert torch.isfinite(x.grad[ok]).all()


@pytest.mark.parametrize("upstream", ["both", "logp", "entropy"])
def test_out_of_range_label_unchecked_gradient_is_nan_in_both_backends(monkeypatch, upstream):
    """The row of an unchecked out-of-range label is NaN in its gradient too, in the
    reference as in the kernel (the reference's torch.where gave that row a gradient of 0);
    the other rows' gradients agree."""
    logits, labels = random_case((6,), 13, torch.float64, ignore_frac=0.0)
    labels[1], labels[3], labels[5] = 13, -3, -100
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
        x = logits.clone().requires_grad_()
        logp, ent = rlhf_fast.logprobs(x, labels, return_entropy=True, check_labels=False)
        total = {"both": logp + ent, "logp": logp, "entropy": ent}[upstream]
        (total * torch.linspace(0.5, 1.5, 6, dtype=torch.float64)).sum().backward()
        assert logp[[1, 3]].isnan().all() and ent[[1, 3]].isnan().all(), backend
        grads[backend] = x.grad
    for backend, grad in grads.items():
        assert grad[[1, 3]].isnan().all(), backend
        assert torch.equal(grad[5], torch.zeros(13)), backend  # ignored: no gradient
        assert torch.isfinite(grad[[0, 2, 4]]).all(), backend
    assert rel_err(grads["triton"][[0, 2, 4]], grads["torch"][[0, 2, 4]]) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignore_index_outside_int32_matches_no_int32_label(monkeypatch, backend):
    """torch compares int32 labels with 5 + 2**32 modulo 2^32, as if it were 5: the row of
    label 5 was ignored by the reference (and by the label check) but not by the kernel.
    Such an ignore_index matches no label."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    logits, labels = random_case((4,), 11, torch.float64, ignore_frac=0.0)
    labels = labels.int()
    labels[2] = 5
    x = logits.clone().requires_grad_()
    logp, ent = rlhf_fast.logprobs(x, labels, ignore_index=5 + 2**32, return_entropy=True)
    (logp + ent).sum().backward()
    ref_x = logits.clone().requires_grad_()
    ref_logp, ref_ent = reference.logprobs(ref_x, labels.long(), return_entropy=True)
    (ref_logp + ref_ent).sum().backward()
    assert logp[2].item() != 0.0 and ent[2].item() != 0.0
    assert rel_err(logp, ref_logp) < 1e-12 and rel_err(ent, ref_ent) < 1e-12
    assert rel_err(x.grad, ref_x.grad) < 1e-12
    labels[2] = 11  # out of range, and not the ignore_index 11 + 2**32
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\).*found 11"):
        rlhf_fast.logprobs(logits, labels, ignore_index=11 + 2**32)


def test_out_of_range_label_checked_raises():
    logits, labels = random_case((5,), 40, torch.float32, ignore_frac=0.0)
    labels[2] = 40
    with pytest.raises(ValueError, match=r"labels must be in \[0, 40\).*found 40"):
        rlhf_fast.logprobs(logits, labels)


def test_batch_invariance():
    """A row's outputs and gradient are bit-identical whatever the other rows and N are."""
    logits, labels = random_case((64,), 5000, torch.bfloat16, ignore_frac=0.1)

    def outputs(rows):
        x = logits[rows].clone().requires_grad_()
        logp, ent = rlhf_fast.logprobs(x, labels[rows], return_entropy=True)
        (logp + 0.5 * ent).sum().backward()
        return logp, ent, x.grad

    full = outputs(slice(0, 64))
    for rows in (slice(0, 1), slice(5, 6), slice(3, 20), slice(40, 64)):
        part = outputs(rows)
        for a, b in zip(part, full):
            assert torch.equal(a, b[rows])
    shuffled = torch.randperm(64)
    for a, b in zip(outputs(shuffled), full):
        assert torch.equal(a, b[shuffled])


# ----------------------------------------------------------------- errors and dispatch


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"logits": [[1.0, 2.0]]}, TypeError, "logits must be a torch.Tensor"),
        ({"logits": torch.ones(3, 4, dtype=torch.long)}, TypeError, "logits must have dtype"),
        ({"labels": torch.zeros(3)}, TypeError, "labels must have dtype"),
        ({"labels": torch.zeros(4, dtype=torch.long)}, ValueError, r"labels must have shape"),
        ({"logits": torch.ones(3, 0)}, ValueError, "V >= 1"),
        ({"logits": torch.tensor(1.0)}, ValueError, "logits must have shape"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite float > 0, got 0.0"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": "1"}, TypeError, "temperature"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ({"ignore_index": 2**70}, ValueError, r"ignore_index must be an int in \[-9223372036854775808, 9223372036854775807\] \(int64\)"),  # noqa: E501
        ({"ignore_index": -(2**63) - 1}, ValueError, r"ignore_index .*\(int64\)"),
        # finite temperatures whose fp32 value (or reciprocal) is 0 or inf in the kernels
        ({"temperature": 1e-300}, ValueError, "temperature must be representable in fp32"),
        ({"temperature": 1e-40}, ValueError, r"temperature .*\[1.17549e-38, 3.40282e\+38\]"),
        ({"temperature": 1e300}, ValueError, "temperature must be representable in fp32"),
        # flags must be real bools: "no" would read as True
        ({"return_entropy": "no"}, TypeError, "return_entropy must be a bool, got str 'no'"),
        ({"return_entropy": 1}, TypeError, "return_entropy must be a bool, got int"),
        ({"return_entropy": None}, TypeError, "return_entropy must be a bool"),
        ({"inplace_backward": "yes"}, TypeError, "inplace_backward must be a bool"),
        ({"check_labels": "no"}, TypeError, "check_labels must be a bool or None"),
        ({"labels": torch.zeros(3, dtype=torch.long, device="meta")}, ValueError, "must be on"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, match):
    args = {"logits": torch.randn(3, 4), "labels": torch.zeros(3, dtype=torch.long)}
    args.update(kwargs)
    logits, labels = args.pop("logits"), args.pop("labels")
    with pytest.raises(error, match=match):
        rlhf_fast.logprobs(logits, labels, **args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ignore_index", [2**63 - 1, -(2**63)])
def test_ignore_index_at_the_ends_of_int64(monkeypatch, backend, ignore_index):
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    logits, labels = random_case((5,), 11, torch.float64, ignore_frac=0.0)
    labels[2] = ignore_index
    logp, entropy = rlhf_fast.logprobs(logits, labels, ignore_index=ignore_index,
                                       return_entropy=True)
    ref_labels = labels.clone()
    ref_labels[2] = -100
    ref_logp, ref_entropy = reference.logprobs(logits, ref_labels, return_entropy=True)
    assert logp[2].item() == 0.0 and entropy[2].item() == 0.0
    assert rel_err(logp, ref_logp) < 1e-12 and rel_err(entropy, ref_entropy) < 1e-12


def test_backend_switch(monkeypatch):
    logits, labels = random_case((4,), 30, torch.float32)
    triton_out = rlhf_fast.logprobs(logits, labels)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    torch_out = rlhf_fast.logprobs(logits, labels)
    assert rel_err(triton_out, torch_out) < 1e-6
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="RLHF_FAST_BACKEND must be one of"):
        rlhf_fast.logprobs(logits, labels)


def test_cpu_fallback_without_interpreter(monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors take the reference path, gradients included."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, labels = random_case((4, 3), 30, torch.bfloat16)
    outs, refs = run_both(logits, labels)
    assert_close(outs, refs, torch.bfloat16)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rlhf_fast.logprobs(logits, labels)


def test_inplace_backward_refuses_logits_that_share_memory():
    base = torch.randn(1, 3, 5, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match=r"inplace_backward=True needs logits .* \(0, 5, 1\)"):
        rlhf_fast.logprobs(base.expand(2, 3, 5), labels, inplace_backward=True)
    # out of place, the expanded view's gradient is the reference's
    rlhf_fast.logprobs(base.expand(2, 3, 5), labels).sum().backward()
    base64 = base.detach().double().requires_grad_()
    reference.logprobs(base64.expand(2, 3, 5), labels).sum().backward()
    assert rel_err(base.grad, base64.grad) < 1e-5


@pytest.mark.parametrize("kind", ["leaf", "view of a leaf", "slice of a leaf"])
def test_inplace_backward_refuses_a_leaf_requiring_grad(kind):
    """Its values would become its gradient (a parameter, or a tensor the caller keeps)."""
    leaf = torch.randn(3, 6, requires_grad=True)
    before = leaf.detach().clone()
    x = {"leaf": leaf, "view of a leaf": leaf.view(3, 6), "slice of a leaf": leaf[:, :5]}[kind]
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="inplace_backward=True needs logits computed by"):
        rlhf_fast.logprobs(x, labels, inplace_backward=True)
    assert torch.equal(leaf.detach(), before)
    # a leaf made from a view of a tensor without grad would overwrite that tensor
    detached = before.clone()[:, :5].requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward"):
        rlhf_fast.logprobs(detached, labels, inplace_backward=True)
    # allowed: an op's output, a view of one, a leaf without grad, and no grad at all
    rlhf_fast.logprobs((leaf * 1)[:, :5], labels, inplace_backward=True).sum().backward()
    rlhf_fast.logprobs(before, labels, inplace_backward=True)
    with torch.no_grad():
        rlhf_fast.logprobs(leaf, labels, inplace_backward=True)
    assert torch.equal(leaf.detach(), before)


def test_second_backward_after_inplace_backward_raises():
    """The first in-place backward turned the logits into their gradient; autograd must
    know, or a retained graph would read the gradient as logits."""
    w = torch.randn(2, 5, requires_grad=True)
    logp = rlhf_fast.logprobs(w * 1, torch.tensor([0, 1]), inplace_backward=True)
    logp.sum().backward(retain_graph=True)
    expected = torch.autograd.grad(reference.logprobs(w.double(), torch.tensor([0, 1])).sum(), w)
    assert rel_err(w.grad, expected[0]) < 1e-5
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()
