"""rlhf_fast.topk_token_divergence: the fused student side (through the interpreter) against
the reference in float64, and the reference against TRL's server-distillation formulas."""

import math

import pytest
import torch

import rlhf_fast
from helpers import assert_module_is_the_function, rel_err
from rlhf_fast import reference

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


def teacher_topk(shape, vocab, k, dtype=torch.float64):
    """A sharp teacher's top k log-probs and ids."""
    log_p = torch.log_softmax(torch.randn(*shape, vocab, dtype=torch.float64) * 3, -1)
    values, ids = log_p.topk(k, -1)
    return values.to(dtype), ids


def run_both(student, values, ids, labels, inplace=False, **options):
    leaf = student.clone().requires_grad_()
    x = leaf * 1 if inplace else leaf
    out = rlhf_fast.topk_token_divergence(x, values, ids, labels, inplace_backward=inplace,
                                          **options)
    x_ref = student.detach().double().requires_grad_()
    ref = reference.topk_token_divergence(x_ref, values.double(), ids, labels, **options)
    upstream = torch.randn(ref.shape, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    return (out, leaf.grad), (ref, x_ref.grad)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence, beta", DIVERGENCES)
def test_fp64_matches_the_reference(tail, divergence, beta):
    """Two vocab blocks, ignored rows, 3-d input, a temperature."""
    vocab = 4096 + 300
    student = torch.randn(2, 3, vocab, dtype=torch.float64) * 2
    values, ids = teacher_topk((2, 3), vocab, 7)
    labels = torch.randint(0, vocab, (2, 3))
    labels[0, 2] = -100
    (out, grad), (ref, grad_ref) = run_both(student, values, ids, labels, tail=tail,
                                            divergence=divergence, beta=beta,
                                            temperature=0.9)
    assert out.dtype == torch.float64 and out.shape == (2, 3) and out[0, 2] == 0
    assert rel_err(out, ref) < 1e-12 and rel_err(grad, grad_ref) < 1e-11
    assert not grad[0, 2].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_student_in_place(dtype):
    student = (torch.randn(6, 500, dtype=torch.float64) * 2).to(dtype)
    values, ids = teacher_topk((6,), 500, 5, torch.float32)
    (out, grad), (ref, grad_ref) = run_both(student, values, ids, torch.rand(6) < 0.8,
                                            inplace=True, divergence="jsd")
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert rel_err(out, ref) < 1e-5
    assert rel_err(grad, grad_ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_every_token_renormalised_is_the_full_divergence():
    """k = V with tail "renormalize": the two distributions are whole, and the op is
    `token_divergence` against the teacher's log-probs as logits."""
    student = torch.randn(4, 64, dtype=torch.float64)
    log_p = torch.log_softmax(torch.randn(4, 64, dtype=torch.float64), -1)
    values, ids = log_p.topk(64, -1)
    for divergence, beta in DIVERGENCES:
        topk = rlhf_fast.topk_token_divergence(student, values, ids, tail="renormalize",
                                               divergence=divergence, beta=beta)
        full = rlhf_fast.token_divergence(student, log_p, divergence=divergence, beta=beta)
        assert rel_err(topk, full) < 1e-12


def test_hand_case():
    """V = 4, k = 2, a temperature (the student's alone: the teacher's log-probs are taken
    as given), both tails, every divergence from its textbook formula, term by term."""
    s, temperature = [0.5, -1.0, 2.0, 0.25], 0.7
    ids, p_top = [2, 0], [0.5, 0.3]  # the teacher's two largest probabilities
    z = [math.exp(v / temperature) for v in s]
    q_top = [z[i] / sum(z) for i in ids]
    tails = {"bucket": (q_top + [1 - sum(q_top)], p_top + [1 - sum(p_top)]),
             "renormalize": ([v / sum(q_top) for v in q_top], [v / sum(p_top) for v in p_top])}
    beta = 0.3

    def kl(a, b):
        return sum(aj * math.log(aj / bj) for aj, bj in zip(a, b))

    student = torch.tensor([s], dtype=torch.float64)
    values = torch.tensor([[math.log(v) for v in p_top]], dtype=torch.float64)
    for tail, (q, p) in tails.items():
        m = [beta * pj + (1 - beta) * qj for pj, qj in zip(p, q)]
        cases = [("forward_kl", 0.5, kl(p, q)), ("reverse_kl", 0.5, kl(q, p)),
                 ("jsd", beta, beta * kl(p, m) + (1 - beta) * kl(q, m))]
        for divergence, b, expected in cases:
            for op in (reference.topk_token_divergence, rlhf_fast.topk_token_divergence):
                got = op(student, values, torch.tensor([ids]), tail=tail,
                         divergence=divergence, beta=b, temperature=temperature)
                assert got.item() == pytest.approx(expected, rel=1e-12), (op, tail, divergence)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_gradcheck_fp64(tail):
    """fast_mode (as token_divergence's): the Jacobian along random directions; a row not
    counted, a temperature."""
    student = torch.randn(3, 9, dtype=torch.float64) * 2
    values, ids = teacher_topk((3,), 9, 3)
    labels = torch.tensor([1, -100, 4])
    for divergence, beta in DIVERGENCES:
        assert torch.autograd.gradcheck(
            lambda x, d=divergence, b=beta: rlhf_fast.topk_token_divergence(
                x, values, ids, labels, tail=tail, divergence=d, beta=b, temperature=1.3),
            (student.clone().requires_grad_(),), fast_mode=True)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_minus_inf_logits_in_either_model(tail):
    """-inf: a token of probability 0, where both are zero adding nothing. The student's
    -inf at a top-k token the teacher gives mass makes the forward KL +inf (its gradient
    finite); the teacher's -inf log-prob at a token the student gives mass makes the
    reverse KL +inf, its gradient undefined across the row (nowhere finite, as the
    reference's); jsd stays finite."""
    vocab = 4096 + 300
    student = torch.randn(4, vocab, dtype=torch.float64) * 2
    values, ids = teacher_topk((4,), vocab, 5)
    student[0, 10:30] = float("-inf")  # outside the top k too, in both vocab blocks
    student[0, 4096 + 7] = float("-inf")
    student[0, ids[0, 4]] = float("-inf")  # a top-k token the student gives probability 0
    student[1, ids[1, 1]] = float("-inf")
    values[2, 3:] = float("-inf")  # listed tokens the teacher gives probability 0
    values[3, 4] = float("-inf")
    student[3, ids[3, 4]] = float("-inf")  # both zero there
    infinite_rows = {"forward_kl": [0, 1], "reverse_kl": [2], "jsd": []}
    for divergence, beta in DIVERGENCES:
        (out, grad), (ref, grad_ref) = run_both(student, values, ids, None, tail=tail,
                                                divergence=divergence, beta=beta)
        infinite = torch.zeros(4, dtype=torch.bool)
        infinite[infinite_rows[divergence]] = True
        assert torch.equal(out.isinf(), infinite) and torch.equal(ref.isinf(), infinite)
        assert (out[infinite] > 0).all() and rel_err(out[~infinite], ref[~infinite]) < 1e-12
        undefined = infinite if divergence == "reverse_kl" else torch.zeros_like(infinite)
        assert not grad[undefined].isfinite().any() and not grad_ref[undefined].isfinite().any()
        assert grad[~undefined].isfinite().all()
        assert rel_err(grad[~undefined], grad_ref[~undefined]) < 1e-11


def trl_sparse_divergence(student_logits, teacher_values, teacher_ids, beta, add_tail):
    """TRL's server distillation on a top-k support, rewritten from
    trl/experimental/server_distillation/server_distillation_trainer.py
    (`_add_tail_bucket`, then `_jsd_divergence` with a full support mask), per token."""
    student_log_probs = torch.log_softmax(student_logits, -1).gather(-1, teacher_ids)

    def tail_bucket(log_probs):
        log_sum = torch.logsumexp(log_probs, -1, keepdim=True).clamp(max=-1e-7)
        return torch.cat([log_probs, torch.log(-torch.expm1(log_sum))], -1)

    if add_tail:
        s, t = tail_bucket(student_log_probs), tail_bucket(teacher_values)
    else:
        s = student_log_probs - torch.logsumexp(student_log_probs, -1, keepdim=True)
        t = teacher_values - torch.logsumexp(teacher_values, -1, keepdim=True)
    q, p = s.exp(), t.exp()
    if beta == 0:
        return (p * (t - s)).sum(-1)
    if beta == 1:
        return (q * (s - t)).sum(-1)
    m = (1 - beta) * q + beta * p
    log_m = torch.log(m.clamp_min(torch.finfo(m.dtype).tiny))
    return (beta * (p * (t - log_m)) + (1 - beta) * (q * (s - log_m))).sum(-1)


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_reference_equals_trls_server_distillation(add_tail, beta):
    student = torch.randn(5, 80, dtype=torch.float64)
    values, ids = teacher_topk((5,), 80, 4)
    ours = reference.topk_token_divergence(student, values, ids, divergence="jsd", beta=beta,
                                           tail="bucket" if add_tail else "renormalize")
    theirs = trl_sparse_divergence(student, values, ids, beta, add_tail)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_repeated_ids_get_their_summed_gradient():
    """An id listed twice is two outcomes of the support: its logit's gradient sums both
    (the kernels' scatter adds, as autograd of the reference's gather does)."""
    student = torch.randn(3, 50, dtype=torch.float64)
    values, ids = teacher_topk((3,), 50, 4)
    ids[:, 2] = ids[:, 0]
    (out, grad), (ref, grad_ref) = run_both(student, values, ids, None, divergence="jsd")
    assert rel_err(out, ref) < 1e-12 and rel_err(grad, grad_ref) < 1e-11


def test_module_is_the_function_with_its_options():
    student = torch.randn(2, 3, 200, dtype=torch.float64, requires_grad=True)
    values, ids = teacher_topk((2, 3), 200, 4)
    labels = torch.tensor([[5, -1, 7], [-100, 2, 3]])
    options = dict(divergence="reverse_kl", temperature=0.8, ignore_index=-1,
                   tail="renormalize")
    assert_module_is_the_function(rlhf_fast.TopKTokenDivergence,
                                  rlhf_fast.topk_token_divergence,
                                  (student, values, ids, labels), options)
    assert_module_is_the_function(rlhf_fast.TopKTokenDivergence,
                                  rlhf_fast.topk_token_divergence,
                                  (student, values, ids, labels), dict(beta=0.2))
    module = rlhf_fast.TopKTokenDivergence()
    with pytest.raises(ValueError, match="inplace_backward=True needs student_logits"):
        module(student, values, ids, inplace_backward=True)  # passed on to the op
    with pytest.raises(ValueError, match="beta is read only by divergence 'jsd'"):
        rlhf_fast.TopKTokenDivergence(divergence="forward_kl", beta=0.2)  # where built


@pytest.mark.parametrize("call, match", [
    (lambda s, v, i: rlhf_fast.topk_token_divergence(s, v[:, :2], i),
     r"teacher_topk_ids must have shape \(4, 2\)"),
    (lambda s, v, i: rlhf_fast.topk_token_divergence(s, v[:2], i[:2]),
     r"teacher_topk_logp must have shape \(4,\) \+ \[K\]"),
    (lambda s, v, i: rlhf_fast.topk_token_divergence(s, v, i + 60),
     r"teacher_topk_ids must be in \[0, 64\)"),
    (lambda s, v, i: rlhf_fast.topk_token_divergence(s, v.requires_grad_(), i),
     "teacher_topk_logp must not require grad"),
    (lambda s, v, i: rlhf_fast.topk_token_divergence(s, v, i, tail="none"),
     "tail must be one of"),
    (lambda s, v, i: rlhf_fast.topk_token_divergence(s, v, i.float()),
     "teacher_topk_ids must have dtype"),
])
def test_bad_input_names_the_argument(call, match):
    student = torch.randn(4, 64)
    values, ids = teacher_topk((4,), 64, 3, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        call(student, values, ids)
