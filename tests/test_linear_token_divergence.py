"""rlhf_fast.linear_token_divergence: the chunked kernels (through the interpreter) against
the reference in float64, chunking forced small so every path runs."""

import math

import pytest
import torch

import rlhf_fast
from helpers import assert_module_is_the_function, rel_err
from rlhf_fast import reference
from rlhf_fast.kernels import linear_token_divergence as kernel

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]
V, D_S, D_T = 300, 6, 5


def random_heads(lead, dtype=torch.float64, bias=True):
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)

    student = dict(student_hidden=t(*lead, D_S), student_weight=t(V, D_S, scale=0.7),
                   student_bias=t(V) if bias else None)
    teacher = dict(teacher_hidden=t(*lead, D_T), teacher_weight=t(V, D_T, scale=0.7),
                   teacher_bias=t(V) if bias else None)
    return student, teacher


def run_both(student, teacher, labels, **options):
    """(value, grads) of the op and of the reference in float64 on the same values, the
    gradients of the student's hidden states, weight and bias."""
    names = ("student_hidden", "student_weight", "student_bias")
    mine = {k: v.clone().requires_grad_() for k, v in student.items() if v is not None}
    theirs = {k: v.double().requires_grad_() for k, v in student.items() if v is not None}
    teacher64 = {k: None if v is None else v.double() for k, v in teacher.items()}

    def call(op, s, t):
        return op(s["student_hidden"], s["student_weight"], t["teacher_hidden"],
                  t["teacher_weight"], labels, student_bias=s.get("student_bias"),
                  teacher_bias=t["teacher_bias"], **options)

    out = call(rlhf_fast.linear_token_divergence, mine, teacher)
    ref = call(reference.linear_token_divergence, theirs, teacher64)
    upstream = torch.randn(ref.shape, dtype=torch.float64)
    wanted = [n for n in names if n in mine]
    grads = torch.autograd.grad((out.double() * upstream).sum(), [mine[n] for n in wanted])
    grads_ref = torch.autograd.grad((ref * upstream).sum(), [theirs[n] for n in wanted])
    return (out, grads), (ref, grads_ref)


@pytest.fixture(params=["one chunk", "chunked"])
def chunking(request, monkeypatch):
    """Chunked: 100 logits of each model at once, so the forward takes one row at a time
    and the backward 256-column slices of a single row (its smallest vocab chunk)."""
    if request.param == "chunked":
        monkeypatch.setattr(kernel, "PAIR_CHUNK", 100)
    return request.param


@pytest.mark.parametrize("divergence, beta", DIVERGENCES)
def test_fp64_matches_the_reference(divergence, beta, chunking):
    student, teacher = random_heads((2, 3))
    labels = torch.randint(0, V, (2, 3))
    labels[1, 0] = -100
    (out, grads), (ref, grads_ref) = run_both(student, teacher, labels, divergence=divergence,
                                              beta=beta, temperature=0.8)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12
    for grad, grad_ref in zip(grads, grads_ref):
        assert rel_err(grad, grad_ref) < 1e-11


def test_fp32_matches_the_reference_on_the_same_values(chunking):
    student, teacher = random_heads((7,), torch.float32, bias=False)
    (out, grads), (ref, grads_ref) = run_both(student, teacher, torch.rand(7) < 0.7)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    for grad, grad_ref in zip(grads, grads_ref):
        assert grad.dtype == torch.float32 and rel_err(grad, grad_ref) < 1e-5


def test_equals_token_divergence_on_the_materialised_logits():
    student, teacher = random_heads((4,))
    logits_s = torch.nn.functional.linear(student["student_hidden"], student["student_weight"],
                                          student["student_bias"])
    logits_t = torch.nn.functional.linear(teacher["teacher_hidden"], teacher["teacher_weight"],
                                          teacher["teacher_bias"])
    fused = rlhf_fast.linear_token_divergence(
        student["student_hidden"], student["student_weight"], teacher["teacher_hidden"],
        teacher["teacher_weight"], student_bias=student["student_bias"],
        teacher_bias=teacher["teacher_bias"], divergence="reverse_kl")
    assert rel_err(fused, rlhf_fast.token_divergence(logits_s, logits_t,
                                                     divergence="reverse_kl")) < 1e-13


def test_uncounted_rows_hold_anything(chunking):
    """NaN hidden states at rows not counted (padding) reach no output and no gradient:
    not d weight either, where 0 * NaN would."""
    student, teacher = random_heads((5,))
    labels = torch.tensor([1, -100, 2, -100, 3])
    student["student_hidden"][1] = float("nan")
    teacher["teacher_hidden"][3] = float("nan")
    (out, grads), (ref, grads_ref) = run_both(student, teacher, labels)
    assert torch.isfinite(out).all() and (out[[1, 3]] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][[1, 3]] == 0).all()
    for grad, grad_ref in zip(grads, grads_ref):
        assert rel_err(grad, grad_ref) < 1e-11


def test_a_frozen_lm_head_gets_no_gradient_and_hidden_still_does():
    student, teacher = random_heads((3,), bias=False)
    hidden = student["student_hidden"].clone().requires_grad_()
    out = rlhf_fast.linear_token_divergence(hidden, student["student_weight"],
                                            teacher["teacher_hidden"], teacher["teacher_weight"])
    (grad,) = torch.autograd.grad(out.sum(), hidden)
    hidden_ref = student["student_hidden"].clone().requires_grad_()
    ref = reference.linear_token_divergence(hidden_ref, student["student_weight"],
                                            teacher["teacher_hidden"], teacher["teacher_weight"])
    (grad_ref,) = torch.autograd.grad(ref.sum(), hidden_ref)
    assert rel_err(grad, grad_ref) < 1e-12


def test_hand_case():
    """V = 3, D_s = 2, D_t = 1, a temperature: each model's logits by hand (hidden . weight
    row + bias), every divergence from its textbook formula, term by term."""
    h_s, w_s, b_s = [0.5, -1.5], [[1.0, 0.5], [-0.5, 2.0], [0.25, -1.0]], [0.1, 0.0, -0.3]
    h_t, w_t, b_t = [2.0], [[0.5], [-1.0], [0.75]], [0.0, 0.2, 0.4]
    temperature, beta = 1.3, 0.3

    def softmax_of_linear(h, w, b):
        z = [math.exp((sum(hi * wi for hi, wi in zip(h, row)) + bj) / temperature)
             for row, bj in zip(w, b)]
        return [v / sum(z) for v in z]

    def kl(a, b):
        return sum(aj * math.log(aj / bj) for aj, bj in zip(a, b))

    q, p = softmax_of_linear(h_s, w_s, b_s), softmax_of_linear(h_t, w_t, b_t)
    m = [beta * pj + (1 - beta) * qj for pj, qj in zip(p, q)]
    cases = [("forward_kl", 0.5, kl(p, q)), ("reverse_kl", 0.5, kl(q, p)),
             ("jsd", beta, beta * kl(p, m) + (1 - beta) * kl(q, m))]

    def f64(values):
        return torch.tensor(values, dtype=torch.float64)

    for divergence, b, expected in cases:
        for op in (reference.linear_token_divergence, rlhf_fast.linear_token_divergence):
            got = op(f64([h_s]), f64(w_s), f64([h_t]), f64(w_t), student_bias=f64(b_s),
                     teacher_bias=f64(b_t), divergence=divergence, beta=b,
                     temperature=temperature)
            assert got.item() == pytest.approx(expected, rel=1e-12), (op, divergence)


def test_gradcheck_fp64(chunking, monkeypatch):
    """The student's hidden states, weight and bias, a row not counted, a temperature;
    chunked: V logits of each model at once (one row per forward chunk; the backward
    accumulates d weight over row chunks)."""
    if chunking == "chunked":
        monkeypatch.setattr(kernel, "PAIR_CHUNK", 11)
    s = [torch.randn(3, 3, dtype=torch.float64, requires_grad=True),
         torch.randn(11, 3, dtype=torch.float64, requires_grad=True),
         torch.randn(11, dtype=torch.float64, requires_grad=True)]
    t_hidden = torch.randn(3, 2, dtype=torch.float64)
    t_weight = torch.randn(11, 2, dtype=torch.float64)
    labels = torch.tensor([1, -100, 4])
    for divergence, beta in DIVERGENCES:
        assert torch.autograd.gradcheck(
            lambda h, w, b, d=divergence, be=beta: rlhf_fast.linear_token_divergence(
                h, w, t_hidden, t_weight, labels, student_bias=b, divergence=d, beta=be,
                temperature=1.3),
            s, fast_mode=True)


def test_module_is_the_function_with_its_options():
    student, teacher = random_heads((2, 3))
    for tensor in student.values():
        tensor.requires_grad_()
    labels = torch.tensor([[5, -1, 7], [-100, 2, 3]])
    args = (student["student_hidden"], student["student_weight"], teacher["teacher_hidden"],
            teacher["teacher_weight"], labels)
    biases = dict(student_bias=student["student_bias"], teacher_bias=teacher["teacher_bias"])
    for options in (dict(divergence="reverse_kl", temperature=0.8, ignore_index=-1),
                    dict(beta=0.2)):
        assert_module_is_the_function(rlhf_fast.LinearTokenDivergence,
                                      rlhf_fast.linear_token_divergence, args, options,
                                      **biases)
    with pytest.raises(ValueError, match="beta is read only by divergence 'jsd'"):
        rlhf_fast.LinearTokenDivergence(divergence="forward_kl", beta=0.2)  # where built


def test_backward_chunks_by_hand(monkeypatch):
    """All tokens per vocab chunk while 256 columns of them fit, fewer rows past that."""
    monkeypatch.setattr(kernel, "PAIR_CHUNK", 1 << 20)
    assert kernel.backward_chunks(1024) == (1024, 1024)
    assert kernel.backward_chunks(4096) == (256, 4096)
    assert kernel.backward_chunks(8192) == (256, 4096)


@pytest.mark.parametrize("change, match", [
    (dict(teacher_weight=torch.randn(V + 1, D_T, dtype=torch.float64)),
     r"teacher_weight must have shape \[V, D\] with V = 300"),
    (dict(teacher_hidden=torch.randn(4, D_T, dtype=torch.float64)),
     r"teacher_hidden must have shape \(3,\)"),
    (dict(teacher_weight=torch.randn(V, D_T, dtype=torch.float64, requires_grad=True)),
     "teacher_weight must not require grad"),
    (dict(student_weight=torch.randn(V, D_S, dtype=torch.float32)),
     "student_weight must have student_hidden's dtype"),
    (dict(student_bias=torch.randn(V + 1, dtype=torch.float64)),
     r"student_bias must have shape \[V\]"),
    (dict(labels=torch.zeros(2, dtype=torch.long)), r"labels must have shape \(3,\)"),
])
def test_bad_input_names_the_argument(change, match):
    student, teacher = random_heads((3,))
    args = {**student, **teacher, "labels": None, **change}
    with pytest.raises((ValueError, TypeError), match=match):
        rlhf_fast.linear_token_divergence(
            args["student_hidden"], args["student_weight"], args["teacher_hidden"],
            args["teacher_weight"], args["labels"], student_bias=args["student_bias"],
            teacher_bias=args["teacher_bias"])
