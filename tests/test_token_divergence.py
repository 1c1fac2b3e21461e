"""rlhf_fast.token_divergence: the Triton kernels (through the interpreter) against the
reference in float64, the reference against hand cases and the peers' formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

import rlhf_fast
from helpers import assert_module_is_the_function, kernel_backward, rel_err
from rlhf_fast import reference
from rlhf_fast.kernels import token_divergence as kernel

BLOCK = 4096
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
               ("jsd", 0.0), ("jsd", 1.0)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def random_pair(shape, vocab, dtype=torch.float64, scale=2.0):
    student = (torch.randn(*shape, vocab, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(*shape, vocab, dtype=torch.float64) * scale).to(dtype)
    return student, teacher


def random_labels(shape, vocab, ignore_frac=0.25):
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignore_frac] = -100
    return labels


def run_both(student, teacher, labels, *, inplace=False, **options):
    """(value, student gradient) of the kernel on the inputs and of the reference in
    float64 on the same (rounded) values, under one random upstream gradient."""
    leaf = student.clone().requires_grad_()
    x = leaf * 1 if inplace else leaf
    out = rlhf_fast.token_divergence(x, teacher, labels, inplace_backward=inplace, **options)
    x_ref = student.detach().double().requires_grad_()
    ref = reference.token_divergence(x_ref, teacher.double(), labels, **options)
    upstream = torch.randn(ref.shape, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    return (out, leaf.grad), (ref, x_ref.grad)


@pytest.mark.parametrize("divergence, beta", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp64_matches_the_reference(divergence, beta, temperature):
    """Several vocab blocks (the max moving between them), ignored rows, 3-d input."""
    student, teacher = random_pair((2, 3), BLOCK + 517)
    labels = random_labels((2, 3), BLOCK + 517)
    (out, grad), (ref, grad_ref) = run_both(student, teacher, labels, divergence=divergence,
                                            beta=beta, temperature=temperature)
    assert out.dtype == torch.float64 and out.shape == (2, 3)
    assert rel_err(out, ref) < 1e-12
    assert rel_err(grad, grad_ref) < 1e-11
    assert torch.equal(out[labels == -100], torch.zeros(int((labels == -100).sum()),
                                                        dtype=torch.float64))


@pytest.mark.parametrize("divergence, beta", DIVERGENCES[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_matches_the_reference_on_the_same_values(divergence, beta, dtype):
    """fp32 math whatever the input: the reference in fp64 on the rounded logits."""
    student, teacher = random_pair((6,), 1000, dtype)
    (out, grad), (ref, grad_ref) = run_both(student, teacher, None, divergence=divergence,
                                            beta=beta)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(grad, grad_ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_mixed_dtypes_and_a_bool_mask():
    """A bf16 student, an fp32 teacher; a bool mask selects the rows (False: 0, no
    gradient, the row never read: NaN there is harmless)."""
    student, teacher = random_pair((5,), 300, torch.bfloat16)
    teacher = teacher.float()
    mask = torch.tensor([True, False, True, True, False])
    student[1] = float("nan")
    teacher[4] = float("nan")
    (out, grad), (ref, grad_ref) = run_both(student, teacher, mask, divergence="jsd")
    assert torch.isfinite(out).all() and torch.isfinite(grad.float()).all()
    assert torch.equal(out[~mask], torch.zeros(2))
    assert torch.equal(grad[~mask].float(), torch.zeros(2, 300))
    assert rel_err(out, ref) < 1e-5


def test_hand_case():
    """V = 3, every divergence from its textbook formula, term by term."""
    s, t = [0.5, -1.0, 2.0], [1.0, 0.0, -0.5]
    q = [math.exp(v) / sum(math.exp(u) for u in s) for v in s]
    p = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
    forward = sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
    reverse = sum(qj * math.log(qj / pj) for pj, qj in zip(p, q))
    beta = 0.3
    m = [beta * pj + (1 - beta) * qj for pj, qj in zip(p, q)]
    jsd = (beta * sum(pj * math.log(pj / mj) for pj, mj in zip(p, m))
           + (1 - beta) * sum(qj * math.log(qj / mj) for qj, mj in zip(q, m)))
    student = torch.tensor([s], dtype=torch.float64)
    teacher = torch.tensor([t], dtype=torch.float64)
    for divergence, b, expected in [("forward_kl", 0.5, forward), ("reverse_kl", 0.5, reverse),
                                    ("jsd", beta, jsd)]:
        for op in (reference.token_divergence, rlhf_fast.token_divergence):
            got = op(student, teacher, divergence=divergence, beta=b)
            assert got.item() == pytest.approx(expected, rel=1e-12), (op, divergence)


def trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss, per token (its reduction left out),
    rewritten from trl/experimental/gkd/gkd_trainer.py."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture = torch.logsumexp(torch.stack([student_log_probs + torch.log1p(-beta_t),
                                               teacher_log_probs + torch.log(beta_t)]), dim=0)
        kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    return jsd.sum(-1)


def liger_jsd(student_logits, teacher_logits, beta):
    """Liger's JSD kernel's loss per row (ops/jsd.py: X = log q, Y = log p, M = beta P +
    (1 - beta) Q, loss = sum beta P Y + (1 - beta) Q X - M log M), in torch."""
    x = F.log_softmax(student_logits, dim=-1)
    y = F.log_softmax(teacher_logits, dim=-1)
    big_p, big_q = y.exp(), x.exp()
    m = beta * big_p + (1 - beta) * big_q
    return (beta * big_p * y + (1 - beta) * big_q * x - m * m.log()).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_reference_equals_trls_generalized_jsd(beta):
    student, teacher = random_pair((4, 3), 50)
    ours = reference.token_divergence(student, teacher, divergence="jsd", beta=beta,
                                      temperature=0.9)
    theirs = trl_generalized_jsd(student, teacher, beta, 0.9)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta", [0.25, 0.5, 0.75])
def test_reference_equals_ligers_jsd(beta):
    student, teacher = random_pair((4,), 50)
    torch.testing.assert_close(reference.token_divergence(student, teacher, beta=beta),
                               liger_jsd(student, teacher, beta), rtol=1e-12, atol=1e-14)


def test_jsd_at_beta_0_and_1_is_the_two_kls():
    student, teacher = random_pair((8,), 700)
    for op in (reference.token_divergence, rlhf_fast.token_divergence):
        assert torch.equal(op(student, teacher, divergence="jsd", beta=0.0),
                           op(student, teacher, divergence="forward_kl"))
        assert torch.equal(op(student, teacher, divergence="jsd", beta=1.0),
                           op(student, teacher, divergence="reverse_kl"))


@pytest.mark.parametrize("divergence, beta", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_logits_give_exactly_zero_and_zero_gradient(divergence, beta, dtype):
    logits, _ = random_pair((5,), BLOCK + 100, dtype, scale=4.0)
    x = logits.clone().requires_grad_()
    out = rlhf_fast.token_divergence(x, logits.clone(), divergence=divergence, beta=beta)
    out.sum().backward()
    if divergence == "jsd" and 0 < beta < 1:  # log2 of the mixture: within rounding of 0
        assert out.abs().max() < 1e-6 and x.grad.float().abs().max() < 1e-6
    else:
        assert torch.equal(out, torch.zeros(5)) and torch.equal(x.grad.float(),
                                                                 torch.zeros_like(x.grad).float())


def test_gradcheck_fp64():
    """fast_mode: the Jacobian checked along random directions, each a whole backward."""
    student, teacher = random_pair((3,), 37)
    labels = torch.tensor([1, -100, 4])
    for divergence, beta in DIVERGENCES[:4]:
        torch.autograd.gradcheck(
            lambda s, d=divergence, b=beta: rlhf_fast.token_divergence(
                s, teacher, labels, divergence=d, beta=b, temperature=1.3),
            (student.clone().requires_grad_(),), fast_mode=True)


@pytest.mark.parametrize("student_zeros_wider", [False, True])
def test_minus_inf_logits_in_either_model(student_zeros_wider):
    """-inf: a token of probability 0, where both are zero adding nothing. Mass of one
    model where the other has none makes that direction's KL +inf: the reverse KL's
    gradient is then undefined (NaN across the row; the reference's -inf and NaN), the
    forward KL's finite (q - p); jsd stays finite."""
    student, teacher = random_pair((3,), BLOCK + 300)
    wide, narrow = (student, teacher) if student_zeros_wider else (teacher, student)
    wide[:, 10:30] = float("-inf")
    narrow[:, 15:30] = float("-inf")
    wide[:, BLOCK + 5] = float("-inf")  # in the second block too
    infinite = "forward_kl" if student_zeros_wider else "reverse_kl"
    for divergence, beta in [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5),
                             ("jsd", 0.3)]:
        (out, grad), (ref, grad_ref) = run_both(student, teacher, None, divergence=divergence,
                                                beta=beta)
        if divergence == infinite:
            assert torch.equal(out, ref) and torch.isinf(out).all()
        else:
            assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-12
        undefined = divergence == infinite == "reverse_kl"  # no gradient anywhere in the row
        assert grad.isnan().all() == undefined and (~grad_ref.isfinite()).all() == undefined
        if not undefined:
            assert rel_err(grad, grad_ref) < 1e-11


def test_nan_reaches_its_row_only():
    student, teacher = random_pair((4,), 300)
    student[1, 7] = float("nan")
    teacher[2, 9] = float("nan")
    out = rlhf_fast.token_divergence(student, teacher)
    assert out[1].isnan() and out[2].isnan()
    assert torch.isfinite(out[[0, 3]]).all()


def test_a_row_is_bit_identical_whatever_the_batch():
    student, teacher = random_pair((6,), 900, torch.float32)
    whole = rlhf_fast.token_divergence(student, teacher, divergence="jsd")
    alone = rlhf_fast.token_divergence(student[3:4], teacher[3:4], divergence="jsd")
    assert torch.equal(whole[3:4], alone)


def test_row_strided_views_and_unmergeable_layouts():
    """logits[:, :-1] is read in place; a [A, B, C, V] view with three leading strides is
    copied; both match the contiguous inputs."""
    student, teacher = random_pair((2, 5), 200, torch.float32)
    labels = random_labels((2, 4), 200)
    sliced = rlhf_fast.token_divergence(student[:, :-1], teacher[:, :-1], labels)
    contiguous = rlhf_fast.token_divergence(student[:, :-1].contiguous(),
                                            teacher[:, :-1].contiguous(), labels)
    assert torch.equal(sliced, contiguous)
    s4, t4 = random_pair((3, 4, 5), 64, torch.float32)
    view = s4.permute(1, 0, 2, 3)[:, :, ::2]  # three leading dims that do not merge
    out = rlhf_fast.token_divergence(view, t4.permute(1, 0, 2, 3)[:, :, ::2])
    ref = rlhf_fast.token_divergence(view.contiguous(),
                                     t4.permute(1, 0, 2, 3)[:, :, ::2].contiguous())
    assert torch.equal(out, ref)


def test_inplace_backward_writes_the_gradient_into_the_student_logits():
    student, teacher = random_pair((4,), 500, torch.float32)
    labels = torch.tensor([3, -100, 7, 1])
    (out, grad), (ref, grad_ref) = run_both(student, teacher, labels, inplace=True,
                                            divergence="reverse_kl")
    (_, grad_copy), _ = run_both(student, teacher, labels, divergence="reverse_kl")
    assert rel_err(grad, grad_ref) < 1e-5
    leaf = student.clone().requires_grad_()
    x = leaf * 1
    rlhf_fast.token_divergence(x, teacher, inplace_backward=True).sum().backward()
    assert torch.equal(x.detach(), leaf.grad)  # the storage holds the gradient now
    with pytest.raises(ValueError, match="inplace_backward=True needs student_logits"):
        rlhf_fast.token_divergence(student.clone().requires_grad_(), teacher,
                                   inplace_backward=True)


def test_backward_of_an_empty_batch_and_of_no_counted_row():
    student, teacher = random_pair((0,), 10, torch.float32)
    x = student.requires_grad_()
    out = rlhf_fast.token_divergence(x, teacher)
    out.sum().backward()
    assert out.shape == (0,) and x.grad.shape == (0, 10)
    student, teacher = random_pair((3,), 10, torch.float32)
    x = student.requires_grad_()
    rlhf_fast.token_divergence(x, teacher, torch.full((3,), -100)).sum().backward()
    assert torch.equal(x.grad, torch.zeros(3, 10))


def test_module_is_the_function_with_its_options():
    student, teacher = random_pair((2, 3), 200)
    student.requires_grad_()
    labels = torch.tensor([[5, -1, 7], [-100, 2, 3]])
    options = dict(divergence="reverse_kl", temperature=0.8, ignore_index=-1)
    assert_module_is_the_function(rlhf_fast.TokenDivergence, rlhf_fast.token_divergence,
                                  (student, teacher, labels), options)
    assert_module_is_the_function(rlhf_fast.TokenDivergence, rlhf_fast.token_divergence,
                                  (student, teacher, labels), dict(beta=0.2))
    module = rlhf_fast.TokenDivergence()
    with pytest.raises(ValueError, match="inplace_backward=True needs student_logits"):
        module(student, teacher, inplace_backward=True)  # passed on to the op
    with pytest.raises(ValueError, match="beta is read only by divergence 'jsd'"):
        rlhf_fast.TokenDivergence(divergence="forward_kl", beta=0.2)  # where it is built


@pytest.mark.parametrize("call, match", [
    (lambda s, t: rlhf_fast.token_divergence(s, t[:, :5]), "teacher_logits must have shape"),
    (lambda s, t: rlhf_fast.token_divergence(s, t.requires_grad_()), "must not require grad"),
    (lambda s, t: rlhf_fast.token_divergence(s, t, torch.zeros(4)), "labels must have dtype in"),
    (lambda s, t: rlhf_fast.token_divergence(s, t, torch.zeros(3, dtype=torch.long)),
     r"labels must have shape \(4,\)"),
    (lambda s, t: rlhf_fast.token_divergence(s, t, divergence="kl"), "divergence must be one"),
    (lambda s, t: rlhf_fast.token_divergence(s, t, beta=1.5), r"beta must be in \[0, 1\]"),
    (lambda s, t: rlhf_fast.token_divergence(s, t, divergence="forward_kl", beta=0.2),
     "beta is read only by divergence 'jsd'"),
    (lambda s, t: rlhf_fast.token_divergence(s, t, temperature=0.0), "temperature must be"),
    (lambda s, t: rlhf_fast.token_divergence(s.t().contiguous().t(), t),
     "student_logits must have stride 1"),
    (lambda s, t: rlhf_fast.token_divergence(s.long(), t), "student_logits must have dtype"),
])
def test_bad_input_names_the_argument(call, match):
    student, teacher = random_pair((4,), 8, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        call(student, teacher)


def test_launches_one_kernel_per_pass():
    """The forward is one launch (jsd's two reads are inside it), the backward one."""
    assert kernel.N_STATS == 5
    student, teacher = random_pair((2,), 64, torch.float32)
    x = student.requires_grad_()
    out = rlhf_fast.token_divergence(x, teacher)
    assert type(out.grad_fn).__name__ == kernel_backward("token_divergence")


def test_the_fast_log2_only_where_compiled_fp32(monkeypatch):
    """jsd's per-element log2 is lg2.approx in compiled fp32 kernels only: the interpreter
    (these tests) and fp64 run the exact one."""
    from rlhf_fast.kernels.common import fast_log2

    assert not fast_log2(torch.float32)  # TRITON_INTERPRET=1 here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fast_log2(torch.float32) and not fast_log2(torch.float64)
