"""rlhf_fast.linear_logprobs: the chunked GEMM + log-prob kernels
(through the interpreter) against the reference on materialised logits, in float64."""


import pytest
import torch

import rlhf_fast
from helpers import kernel_backward, leaves, random_linear_case, rel_err
from rlhf_fast import reference
from rlhf_fast.kernels import linear_logprobs as kernel

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
LOW_TOL = 3e-2  # bf16 / fp16: the logits and the gradient GEMMs are in the input dtype
NAMES = ("logp", "entropy", "d_hidden", "d_weight", "d_bias")
KERNEL_BACKWARD = kernel_backward("linear_logprobs")
ALL = (True, True, True)


def forward_backward(fn, hidden, weight, bias, labels, g_logp, g_ent, **kw):
    """`fn(...)` with return_entropy=True, then backward from the float64 upstream gradients
    of the outputs whose g is not None. Returns [logp, entropy, d hidden, d weight, d bias]."""
    logp, ent = fn(hidden, weight, labels, bias=bias, return_entropy=True, **kw)
    total = sum((out.double() * g).sum() for out, g in ((logp, g_logp), (ent, g_ent))
                if g is not None)
    if torch.is_tensor(total) and total.requires_grad:
        total.backward()
    grads = [None if t is None else t.grad for t in (hidden, weight, bias)]
    return [logp.detach(), ent.detach(), *grads]


def kernel_ran(out):
    """Whether `out` came out of the op's custom op (not the reference fallback)."""
    fn = out.grad_fn
    while fn is not None and type(fn).__name__ == "ViewBackward0":
        fn = fn.next_functions[0][0]
    return type(fn).__name__ == KERNEL_BACKWARD


def upstream(shape, which="both"):
    g_logp = torch.randn(shape, dtype=F64) if which in ("both", "logp") else None
    g_ent = torch.randn(shape, dtype=F64) if which in ("both", "entropy") else None
    return g_logp, g_ent


def run_op(hidden, weight, bias, labels, grads, train=ALL, **kw):
    return forward_backward(rlhf_fast.linear_logprobs, *leaves(hidden, weight, bias, train),
                            labels, *grads, **kw)


def run_ref(hidden, weight, bias, labels, grads, train=ALL, dtype=F64, **kw):
    return forward_backward(reference.linear_logprobs,
                            *leaves(hidden, weight, bias, train, dtype), labels, *grads, **kw)


def assert_close(outs, refs, tol, what="reference"):
    for name, out, ref in zip(NAMES, outs, refs):
        if ref is None:
            assert out is None, f"{name}: expected None, got a tensor"
            continue
        assert out is not None, f"{name}: missing"
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        err = rel_err(out, ref)
        assert err < tol, f"{name}: relative error {err:.3g} to the {what} >= {tol}"


def compare(hidden, weight, bias, labels, tol, train=ALL, which="both", **kw):
    """The op against the float64 reference on the same (rounded) inputs."""
    grads = upstream(labels.shape, which)
    outs = run_op(hidden, weight, bias, labels, grads, train, **kw)
    refs = run_ref(hidden, weight, bias, labels, grads, train, **kw)
    assert_close(outs, refs, tol)
    return outs, refs


# ----------------------------------------------------------------- reference vs hand math


def test_reference_is_log_softmax_of_the_materialised_logits():
    hidden, weight, bias, labels = random_linear_case((6,), 5, 11)
    labels[0] = -100
    logp, ent = reference.linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=0.5, return_entropy=True
    )
    log_p = torch.log_softmax((hidden @ weight.T + bias) / 0.5, dim=-1)
    valid = labels != -100
    expect = log_p[valid].gather(-1, labels[valid, None]).squeeze(-1)
    assert torch.allclose(logp[valid], expect, rtol=1e-12, atol=1e-12)
    assert torch.allclose(ent[valid], -(log_p.exp() * log_p).sum(-1)[valid], rtol=1e-12)
    assert logp[0] == 0 and ent[0] == 0


# ----------------------------------------------------------------- op vs reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias, temperature", [(True, 1.0), (False, 0.7), (True, 1.5)])
def test_matches_reference(dtype, bias, temperature, poisoned):
    hidden, weight, b, labels = random_linear_case((37,), 48, 997, dtype, bias=bias)
    grads = upstream(labels.shape)
    outs = run_op(hidden, weight, b, labels, grads, temperature=temperature)
    refs = run_ref(hidden, weight, b, labels, grads, temperature=temperature)
    out_dtype = F64 if dtype == F64 else torch.float32
    assert outs[0].dtype == outs[1].dtype == out_dtype
    for grad in outs[2:]:
        assert grad is None or grad.dtype == dtype
    assert_close(outs, refs, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias, temperature", [(True, 0.7), (False, 1.0)])
def test_low_precision_no_worse_than_eager(dtype, bias, temperature):
    """bf16 / fp16: the op's error to the float64 reference (on the same rounded inputs) is
    small and at most twice that of the eager path (logits materialised in the same dtype,
    autograd through them), which has the same roundings in its logits and gradient GEMMs."""
    hidden, weight, b, labels = random_linear_case((61,), 64, 509, dtype, bias=bias)
    grads = upstream(labels.shape)
    kw = dict(temperature=temperature)
    outs = run_op(hidden, weight, b, labels, grads, **kw)
    refs = run_ref(hidden, weight, b, labels, grads, **kw)
    eager = run_ref(hidden, weight, b, labels, grads, dtype=dtype, **kw)
    assert outs[0].dtype == outs[1].dtype == torch.float32
    for name, out, ref, ref_eager in zip(NAMES, outs, refs, eager):
        if ref is None:
            assert out is None
            continue
        if name.startswith("d_"):
            assert out.dtype == dtype, name
        err, err_eager = rel_err(out, ref), rel_err(ref_eager, ref)
        assert err < LOW_TOL, f"{name}: relative error {err:.3g} >= {LOW_TOL}"
        assert err <= 2 * err_eager + 1e-4, f"{name}: {err:.3g} vs eager {err_eager:.3g}"


# ----------------------------------------------------------------- chunking


@pytest.fixture
def chunks(monkeypatch):
    """set(elements, min_vocab): shrink the chunks; calls: the [rows, cols] of every lm_head
    GEMM the op ran (forward: token chunks [n, V]; backward: vocab chunks [N, v])."""
    calls = []
    real_lm_head = kernel.lm_head

    def recording_lm_head(hidden, weight, bias):
        calls.append((hidden.shape[0], weight.shape[0]))
        return real_lm_head(hidden, weight, bias)

    def set_chunks(elements, min_vocab):
        monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", elements)
        monkeypatch.setattr(kernel, "MIN_VOCAB_CHUNK", min_vocab)

    monkeypatch.setattr(kernel, "lm_head", recording_lm_head)
    set_chunks.calls = calls
    return set_chunks


def expected_calls(n_tokens, vocab, rows, cols, back_rows=None):
    back_rows = back_rows or n_tokens
    forward = [(min(rows, n_tokens - s), vocab) for s in range(0, n_tokens, rows)]
    backward = [(min(back_rows, n_tokens - r), min(cols, vocab - s))
                for s in range(0, vocab, cols) for r in range(0, n_tokens, back_rows)]
    return forward + backward


# elements, min vocab chunk -> N = 37, V = 211: forward 6 chunks of 7 rows + one of 2;
# backward 6 of 32 columns + one of 19 | forward 37 chunks of 1 row; backward 13 of 16
# columns + one of 3, each over 6 chunks of 6 tokens + one of 1 (16 x 37 > 100 elements).
CHUNK_CONFIGS = [(1500, 16), (100, 16)]


@pytest.mark.parametrize(
    "elements, min_vocab, train",
    [(*CHUNK_CONFIGS[0], ALL), (*CHUNK_CONFIGS[0], (True, False, False)),
     (*CHUNK_CONFIGS[0], (False, True, True)), (*CHUNK_CONFIGS[1], ALL)],
    ids=["all", "frozen-weight", "frozen-hidden", "one-row-chunks"],
)
def test_many_chunks_match_one_chunk_float64(elements, min_vocab, train, chunks, poisoned):
    n_tokens, vocab = 37, 211
    hidden, weight, bias, labels = random_linear_case((n_tokens,), 24, vocab, F64)
    grads = upstream(labels.shape)
    kw = dict(temperature=0.7)
    single = run_op(hidden, weight, bias, labels, grads, train, **kw)
    assert chunks.calls == expected_calls(n_tokens, vocab, n_tokens, vocab)
    chunks.calls.clear()
    chunks(elements, min_vocab)
    rows, cols = kernel.token_chunk(vocab), kernel.vocab_chunk(n_tokens)
    back_rows = kernel.backward_token_chunk(n_tokens)
    assert (rows == 1 or n_tokens % rows) and vocab % cols  # ragged last chunks
    assert n_tokens // rows >= 3 and vocab // cols >= 3
    assert back_rows == n_tokens or (n_tokens % back_rows and back_rows * cols <= elements)
    many = run_op(hidden, weight, bias, labels, grads, train, **kw)
    assert chunks.calls == expected_calls(n_tokens, vocab, rows, cols, back_rows)
    assert_close(many, single, 1e-12, "single-chunk run")
    assert_close(many, run_ref(hidden, weight, bias, labels, grads, train, **kw), TOL[F64])


@pytest.mark.parametrize("config", CHUNK_CONFIGS, ids=["chunks", "token-chunked-backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_chunks_low_precision(config, dtype, chunks):
    hidden, weight, bias, labels = random_linear_case((37,), 24, 211, dtype)
    grads = upstream(labels.shape)
    single = run_op(hidden, weight, bias, labels, grads)
    chunks(*config)
    many = run_op(hidden, weight, bias, labels, grads)
    expected = expected_calls(37, 211, kernel.token_chunk(211), kernel.vocab_chunk(37),
                              kernel.backward_token_chunk(37))
    assert chunks.calls[2:] == expected  # after the single-chunk run
    tol = TOL.get(dtype, LOW_TOL)
    assert_close(many, single, tol, "single-chunk run")
    assert_close(many, run_ref(hidden, weight, bias, labels, grads), tol)


@pytest.mark.parametrize("config", [None, *CHUNK_CONFIGS],
                         ids=["one-chunk", "chunks", "token-chunked-backward"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_log_sum_p2_with_the_other_outputs(config, dtype, chunks, poisoned):
    """return_sum_p2: log sum_j p_j^2 and the gradients from all three outputs against the
    reference, in one chunk and across vocab chunks (the backward reads each row's
    log_sum_p2 with the columns of its chunk)."""
    if config is not None:
        chunks(*config)
    hidden, weight, bias, labels = random_linear_case((37,), 24, 211, dtype)
    runs = []
    for fn, run_dtype in ((rlhf_fast.linear_logprobs, dtype), (reference.linear_logprobs, F64)):
        h, w, b = leaves(hidden, weight, bias, dtype=run_dtype)
        outs = fn(h, w, labels, bias=b, return_entropy=True, return_sum_p2=True,
                  temperature=0.7)
        assert kernel_ran(outs[0]) == (fn is rlhf_fast.linear_logprobs)
        gen = torch.Generator().manual_seed(1)
        sum((out.double() * torch.randn(out.shape, dtype=F64, generator=gen)).sum()
            for out in outs).backward()
        runs.append([out.detach() for out in outs] + [h.grad, w.grad, b.grad])
    assert runs[0][2].dtype == runs[0][0].dtype
    for name, out, ref in zip(("logp", "entropy", "log_sum_p2", *NAMES[2:]), *runs):
        assert rel_err(out, ref) < TOL[dtype], name


def test_chunk_sizes():
    """No chunk holds more than CHUNK_ELEMENTS logits, whatever N (V <= CHUNK_ELEMENTS)."""
    assert kernel.token_chunk(kernel.CHUNK_ELEMENTS * 2) == 1
    assert kernel.token_chunk(1000) == kernel.CHUNK_ELEMENTS // 1000
    for n_tokens in (1, 1000, 2**19, 2**19 + 1, 2**21 + 3, kernel.CHUNK_ELEMENTS * 3):
        cols = kernel.vocab_chunk(n_tokens)
        rows = kernel.backward_token_chunk(n_tokens)
        assert cols >= kernel.MIN_VOCAB_CHUNK and cols % kernel.MIN_VOCAB_CHUNK == 0
        assert 1 <= rows <= n_tokens and rows * cols <= kernel.CHUNK_ELEMENTS
        assert rows == n_tokens or cols == kernel.MIN_VOCAB_CHUNK  # tokens split last
    assert kernel.backward_token_chunk(2**19) == 2**19
    assert kernel.backward_token_chunk(0) == 1


# ----------------------------------------------------------------- what trains


@pytest.mark.parametrize(
    "train",
    [(True, False, False), (True, False, True), (False, True, False), (False, True, True),
     (False, False, True), (True, True, False)],
    ids=["hidden", "hidden+bias", "weight", "weight+bias", "bias", "hidden+weight"],
)
def test_frozen_parameters(train):
    """Frozen weight (LoRA), frozen hidden, frozen bias: the trained ones get the right
    gradient, the frozen ones none."""
    hidden, weight, bias, labels = random_linear_case((19,), 16, 101, F64)
    outs, _ = compare(hidden, weight, bias, labels, TOL[F64], train, temperature=1.5)
    for grad, trains in zip(outs[2:], train):
        assert (grad is not None) == trains


def test_frozen_weight_without_bias():
    hidden, weight, _, labels = random_linear_case((3, 7), 16, 101, F64, bias=False)
    outs, _ = compare(hidden, weight, None, labels, TOL[F64], (True, False, False))
    assert outs[3] is None


def test_nothing_trains():
    hidden, weight, bias, labels = random_linear_case((9,), 8, 50, torch.float32)
    logp, ent = rlhf_fast.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
    assert not logp.requires_grad and not ent.requires_grad
    ref_logp, ref_ent = reference.linear_logprobs(
        hidden.double(), weight.double(), labels, bias=bias.double(), return_entropy=True
    )
    assert rel_err(logp, ref_logp) < 1e-5 and rel_err(ent, ref_ent) < 1e-5


def test_the_kernel_path_runs():
    hidden, weight, bias, labels = random_linear_case((5,), 8, 30, torch.float32)
    logp = rlhf_fast.linear_logprobs(hidden.requires_grad_(), weight, labels, bias=bias)
    assert kernel_ran(logp)


# ----------------------------------------------------------------- one output only


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_gradient_from_one_output_only(which):
    hidden, weight, bias, labels = random_linear_case((23,), 16, 131, F64)
    compare(hidden, weight, bias, labels, TOL[F64], which=which, temperature=0.7)


def test_without_entropy():
    hidden, weight, bias, labels = random_linear_case((23,), 16, 131, F64)
    g = torch.randn(23, dtype=F64)
    outs = []
    for fn in (rlhf_fast.linear_logprobs, reference.linear_logprobs):
        h, w, b = leaves(hidden, weight, bias)
        logp = fn(h, w, labels, bias=b, temperature=1.5)
        assert logp.shape == (23,)
        (logp * g).sum().backward()
        outs.append((logp, h.grad, w.grad, b.grad))
    for name, out, ref in zip(("logp", "d_hidden", "d_weight", "d_bias"), *outs):
        assert rel_err(out, ref) < TOL[F64], name


# ----------------------------------------------------------------- ignore_index


def test_ignored_rows_give_zero_and_no_gradient():
    hidden, weight, bias, labels = random_linear_case((16,), 12, 60, F64, ignore_frac=0.0)
    labels[::3] = 7  # a custom ignore_index that is also a valid token id
    ignored = labels == 7
    outs, _ = compare(hidden, weight, bias, labels, TOL[F64], ignore_index=7)
    logp, ent, d_hidden, d_weight, d_bias = outs
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (d_hidden[ignored] == 0).all()
    assert (logp[~ignored] < 0).all() and (d_hidden[~ignored] != 0).any(-1).all()
    # No contribution to d weight / d bias: the same as running on the other rows only.
    grads = upstream(labels.shape)
    kept = run_op(hidden[~ignored], weight, bias, labels[~ignored],
                  [g[~ignored] for g in grads], ignore_index=7)
    full = run_op(hidden, weight, bias, labels, grads, ignore_index=7)
    assert rel_err(full[3], kept[3]) < 1e-12 and rel_err(full[4], kept[4]) < 1e-12


def test_all_rows_ignored(poisoned):
    hidden, weight, bias, labels = random_linear_case((2, 5), 8, 40, torch.bfloat16)
    labels.fill_(-100)
    outs = run_op(hidden, weight, bias, labels, upstream(labels.shape))
    shapes = (labels.shape, labels.shape, hidden.shape, weight.shape, bias.shape)
    for name, out, shape in zip(NAMES, outs, shapes):
        assert out.shape == shape and (out == 0).all(), name


# ----------------------------------------------------------------- shapes and views


@pytest.mark.parametrize("n_tokens", [0, 1, 13])
@pytest.mark.parametrize("vocab", [1, 2, 13, 257])
def test_edge_shapes(n_tokens, vocab, poisoned):
    hidden, weight, bias, labels = random_linear_case((n_tokens,), 6, vocab, F64)
    outs, _ = compare(hidden, weight, bias, labels, TOL[F64], temperature=0.7)
    assert outs[0].shape == outs[1].shape == (n_tokens,)
    assert outs[2].shape == (n_tokens, 6)
    assert outs[3].shape == (vocab, 6) and outs[4].shape == (vocab,)
    if n_tokens == 0:
        assert (outs[3] == 0).all() and (outs[4] == 0).all()
    if vocab == 1:  # one token: log-prob 0, entropy 0, no gradient
        for out in outs:
            assert (out == 0).all()


@pytest.mark.parametrize("dim, vocab", [(16, 262144), (8192, 40)], ids=["V=2^18", "D=8192"])
def test_largest_vocab_and_hidden_size(dim, vocab):
    # float64: an fp32 GEMM's rounding over 2^18 terms is ~1e-5 by itself
    hidden, weight, bias, labels = random_linear_case((3,), dim, vocab, F64)
    compare(hidden, weight, bias, labels, TOL[F64])


def test_leading_dims_and_strided_views():
    """[B, T, D] hidden, the hidden[:, :-1] view (hidden[:, t] predicts labels[:, t + 1])
    and a weight that is a column slice of a wider tensor: the same as contiguous copies."""
    full, weight, bias, _ = random_linear_case((3, 9), 10, 71, F64)
    wide = torch.cat([weight, torch.randn(71, 3, dtype=F64)], 1)
    labels = torch.randint(0, 71, (3, 9))
    labels[0, 2] = -100
    grads = upstream((3, 8))
    kw = dict(temperature=0.7)
    copies = run_op(full[:, :-1].contiguous(), weight, bias, labels[:, 1:], grads, **kw)
    assert copies[0].shape == (3, 8) and copies[2].shape == (3, 8, 10)
    assert_close(copies, run_ref(full[:, :-1], weight, bias, labels[:, 1:], grads, **kw),
                 TOL[F64])
    h_leaf, w_leaf, b_leaf = leaves(full, wide, bias)
    hidden, weight_view = h_leaf[:, :-1], w_leaf[:, :10]
    assert not hidden.is_contiguous() and not weight_view.is_contiguous()
    logp, ent = rlhf_fast.linear_logprobs(hidden, weight_view, labels[:, 1:], bias=b_leaf,
                                          return_entropy=True, **kw)
    (logp.double() * grads[0] + ent.double() * grads[1]).sum().backward()
    assert torch.equal(logp, copies[0]) and torch.equal(ent, copies[1])
    assert torch.equal(h_leaf.grad[:, :-1], copies[2]) and (h_leaf.grad[:, -1] == 0).all()
    assert torch.equal(w_leaf.grad[:, :10], copies[3]) and (w_leaf.grad[:, 10:] == 0).all()
    assert torch.equal(b_leaf.grad, copies[4])


def test_int32_labels():
    hidden, weight, bias, labels = random_linear_case((4, 5), 8, 90, torch.float32)
    compare(hidden, weight, bias, labels.to(torch.int32), TOL[torch.float32])


# ----------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("chunked", [False, True])
def test_gradcheck_float64(chunked, chunks):
    hidden, weight, bias, labels = random_linear_case((5,), 4, 13, F64, ignore_frac=0.0)
    labels[3] = -100
    if chunked:  # forward 2 + 2 + 1 rows; backward 4 + 4 + 4 + 1 columns
        chunks(26, 4)
    mix_logp, mix_ent = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)

    def both(h, w, b):
        logp, ent = rlhf_fast.linear_logprobs(
            h, w, labels, bias=b, temperature=1.3, return_entropy=True
        )
        return logp * mix_logp + ent * mix_ent

    inputs = tuple(t.requires_grad_() for t in (hidden, weight, bias))
    # chunked: a random projection of the Jacobian (the full check is slow there; the
    # chunked gradients also equal the single-chunk ones in test_many_chunks_*).
    assert torch.autograd.gradcheck(both, inputs, eps=1e-6, atol=1e-7, fast_mode=chunked)
    if chunked:
        assert (2, 13) in chunks.calls and (5, 1) in chunks.calls


def test_double_backward_is_right_or_refused():
    hidden, weight, _, labels = random_linear_case((4,), 3, 7, F64, bias=False, ignore_frac=0.0)
    v = torch.randn(4, 3, dtype=F64)
    second = []
    for fn in (rlhf_fast.linear_logprobs, reference.linear_logprobs):
        x = hidden.clone().requires_grad_()
        try:
            (g,) = torch.autograd.grad(fn(x, weight, labels).sum(), x, create_graph=True)
            (gg,) = torch.autograd.grad((g * v).sum(), x)
        except RuntimeError:  # refusing (once_differentiable) is fine, a wrong answer is not
            assert fn is rlhf_fast.linear_logprobs
            return
        second.append(gg)
    assert rel_err(*second) < TOL[F64]


# ----------------------------------------------------------------- labels out of range


def test_out_of_range_label_checked_raises():
    hidden, weight, bias, labels = random_linear_case((5,), 8, 40, torch.float32)
    for bad in (40, -3):
        labels[2] = bad
        with pytest.raises(ValueError, match=rf"labels must be in \[0, 40\).*found {bad}"):
            rlhf_fast.linear_logprobs(hidden, weight, labels, bias=bias)


def test_out_of_range_label_unchecked_gives_nan_for_its_row_only():
    hidden, weight, bias, labels = random_linear_case((6,), 8, 40, F64, ignore_frac=0.0)
    clean = rlhf_fast.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
    labels[1], labels[4] = 40, -3
    h = hidden.clone().requires_grad_()
    logp, ent = rlhf_fast.linear_logprobs(
        h, weight, labels, bias=bias, return_entropy=True, check_labels=False
    )
    ok = [0, 2, 3, 5]
    assert logp[[1, 4]].isnan().all() and ent[[1, 4]].isnan().all()
    assert torch.equal(logp[ok], clean[0][ok]) and torch.equal(ent[ok], clean[1][ok])
    g = torch.zeros(6, dtype=F64)
    g[ok] = torch.randn(4, dtype=F64)
    (logp[ok] * g[ok] + ent[ok] * g[ok]).sum().backward()
    h_ref = hidden.clone().requires_grad_()
    ref_logp, ref_ent = reference.linear_logprobs(
        h_ref[ok], weight, labels[ok], bias=bias, return_entropy=True
    )
    (ref_logp * g[ok] + ref_ent * g[ok]).sum().backward()
    assert rel_err(h.grad[ok], h_ref.grad[ok]) < TOL[F64]


def test_out_of_range_label_unchecked_gradients_agree_between_backends(monkeypatch):
    """An unchecked out-of-range label: its d hidden row is NaN in both backends (the
    reference's was 0), d weight and d bias are NaN whole in both (its NaN d logits row
    meets every vocab row); the other rows' d hidden agree."""
    hidden, weight, bias, labels = random_linear_case((6,), 8, 40, F64, ignore_frac=0.0)
    labels[1], labels[4], labels[5] = 40, -3, -100
    grads = upstream(6)
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
        outs[backend] = run_op(hidden, weight, bias, labels, grads, check_labels=False)
    ok = [0, 2, 3]
    for backend, (logp, ent, d_hidden, d_weight, d_bias) in outs.items():
        assert logp[[1, 4]].isnan().all() and ent[[1, 4]].isnan().all(), backend
        assert d_hidden[[1, 4]].isnan().all(), backend
        assert torch.equal(d_hidden[5], torch.zeros(8, dtype=F64)), backend
        assert torch.isfinite(d_hidden[ok]).all(), backend
        assert d_weight.isnan().all() and d_bias.isnan().all(), backend
    assert rel_err(outs["triton"][2][ok], outs["torch"][2][ok]) < TOL[F64]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignore_index_outside_int32_matches_no_int32_label(monkeypatch, backend):
    """int32 labels and ignore_index = 5 + 2**32: the row of label 5 is not ignored (torch
    compares int32 with it modulo 2^32: the reference dropped that row, and the kernel path
    zeroed its hidden state in d weight)."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    hidden, weight, bias, labels = random_linear_case((5,), 8, 11, F64, ignore_frac=0.0)
    labels[2] = 5
    grads = upstream(5)
    outs = run_op(hidden, weight, bias, labels.int(), grads, ignore_index=5 + 2**32)
    refs = run_ref(hidden, weight, bias, labels, grads)
    assert outs[0][2].item() != 0.0
    assert_close(outs, refs, TOL[F64])


# ----------------------------------------------------------------- errors and dispatch


def bad_input_cases():
    d = 5
    return [
        ({"hidden": torch.ones(3, d, dtype=torch.long)}, TypeError, "hidden must have dtype"),
        ({"hidden": torch.ones(3, 0)}, ValueError, "hidden must have shape.*D >= 1"),
        ({"weight": torch.randn(11, d + 1)}, ValueError,
         r"weight must have shape \[V, D\].*D = hidden.shape\[-1\] = 5, got \(11, 6\)"),
        ({"weight": torch.randn(11)}, ValueError, r"weight must have shape .*got \(11,\)"),
        ({"weight": torch.randn(0, d)}, ValueError, "weight must have shape.*V >= 1"),
        ({"weight": torch.randn(11, d, dtype=F64)}, TypeError,
         r"weight must have hidden's dtype torch.float32 \(or run under autocast, which "
         r"casts both\), got torch.float64"),
        ({"weight": torch.ones(11, d, dtype=torch.long)}, TypeError, "weight must have dtype"),
        ({"weight": [[1.0] * d]}, TypeError, "weight must be a torch.Tensor"),
        ({"bias": torch.randn(12)}, ValueError,
         r"bias must have shape \[V\] = \(11,\), got \(12,\)"),
        ({"bias": torch.randn(1, 11)}, ValueError, r"bias must have shape .*got \(1, 11\)"),
        ({"bias": torch.randn(11, dtype=torch.bfloat16)}, TypeError,
         r"bias must have hidden's dtype torch.float32 \(or run under autocast.*\), got "
         "torch.bfloat16"),
        ({"labels": torch.zeros(4, dtype=torch.long)}, ValueError,
         r"labels must have shape \(3,\).*got \(4,\)"),
        ({"labels": torch.zeros(3, 1, dtype=torch.long)}, ValueError, "labels must have shape"),
        ({"labels": torch.zeros(3)}, TypeError, "labels must have dtype"),
        ({"labels": torch.zeros(3, dtype=torch.long, device="meta")}, ValueError,
         "labels must be on hidden's device"),
        ({"weight": torch.randn(11, d, device="meta")}, ValueError,
         "weight must be on hidden's device"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite float > 0, got 0.0"),
        ({"temperature": -0.5}, ValueError, "temperature.*-0.5"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": "1"}, TypeError, "temperature"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ({"ignore_index": 2**70}, ValueError, r"ignore_index must be an int in .* \(int64\)"),
        ({"return_entropy": "no"}, TypeError, "return_entropy must be a bool, got str 'no'"),
        ({"check_labels": 1}, TypeError, "check_labels must be a bool or None, got int 1"),
    ]


@pytest.mark.parametrize("kwargs, error, match", bad_input_cases())
def test_bad_inputs_raise_clear_errors(kwargs, error, match):
    args = {"hidden": torch.randn(3, 5), "weight": torch.randn(11, 5), "bias": torch.randn(11),
            "labels": torch.zeros(3, dtype=torch.long)}
    args.update(kwargs)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(error, match=match):
        rlhf_fast.linear_logprobs(hidden, weight, labels, **args)


def test_backend_switch(monkeypatch):
    hidden, weight, bias, labels = random_linear_case((2, 6), 8, 70, torch.float32)
    grads = upstream(labels.shape)
    triton_outs = run_op(hidden, weight, bias, labels, grads, temperature=0.7)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    torch_outs = run_op(hidden, weight, bias, labels, grads, temperature=0.7)
    eager = run_ref(hidden, weight, bias, labels, grads, dtype=torch.float32, temperature=0.7)
    for name, out, ref in zip(NAMES, torch_outs, eager):
        assert torch.equal(out, ref), name
    assert_close(triton_outs, torch_outs, 1e-5, "torch backend")
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="RLHF_FAST_BACKEND must be one of"):
        rlhf_fast.linear_logprobs(hidden, weight, labels)


def test_cpu_fallback_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, bias, labels = random_linear_case((7,), 8, 30, torch.float32)
    h = hidden.clone().requires_grad_()
    logp = rlhf_fast.linear_logprobs(h, weight, labels, bias=bias)
    assert not kernel_ran(logp)
    assert torch.equal(logp, reference.linear_logprobs(hidden, weight, labels, bias=bias))


def test_nan_hidden_state_at_ignored_or_masked_tokens_reaches_no_gradient():
    """Attention over a fully masked padding row can give a NaN hidden state there; with
    d weight = d logits^T hidden, 0 * NaN would spread it over the whole gradient."""
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    with torch.no_grad():
        hidden[0, 1] = float("nan")
    weight = torch.randn(7, 4, requires_grad=True)
    labels = torch.tensor([[1, -100, 2], [3, 4, 5]])
    mask = labels != -100
    clean = hidden.detach().clone()
    clean[0, 1] = 0.0
    for fn in (rlhf_fast.linear_logprobs, reference.linear_logprobs):
        logp = fn(hidden, weight, labels)
        assert logp[0, 1] == 0 and not logp.isnan().any()
        grads = torch.autograd.grad(logp.sum(), (hidden, weight))
        expected = torch.autograd.grad(fn(clean.requires_grad_(), weight, labels).sum(),
                                       (clean, weight))
        for grad, want in zip(grads, expected):
            assert not grad.isnan().any() and rel_err(grad, want) < 1e-6
    masked_labels = labels.clamp(min=0)  # valid labels, but outside the mask
    ppo = rlhf_fast.linear_ppo_loss(hidden, weight, masked_labels, torch.zeros(2, 3),
                                    torch.randn(2, 3), mask)
    dpo = rlhf_fast.linear_dpo_loss(hidden, weight, masked_labels, mask, torch.zeros(1),
                                    torch.zeros(1))
    for loss in (ppo.loss, dpo.loss):
        grads = torch.autograd.grad(loss, (hidden, weight))
        assert loss.isfinite() and all(not g.isnan().any() for g in grads)
        assert not grads[0][0, 1].any()


# ----------------------------------------------------------------- autocast


def bf16_logits_reference(hidden, weight, bias, labels, g_logp, g_ent):
    """[logp, entropy, d hidden, d weight, d bias] in float64 of the bf16 logits that
    autocast's lm_head makes (F.linear of the bf16-cast inputs), differentiated exactly
    from there: what the op computes, up to its fp32 softmax and bf16 d logits."""
    cast = [None if t is None else t.detach().bfloat16() for t in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(*cast).double().requires_grad_()
    logp, ent = reference.logprobs(logits, labels, return_entropy=True)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    d_logits = logits.grad
    h, w = cast[0].double(), cast[1].double()
    return [logp.detach(), ent.detach(), d_logits @ w, d_logits.T @ h, d_logits.sum(0)]


AUTOCAST_DTYPES = [  # (hidden, weight and bias): fp32 model; bf16 activations, fp32 weights
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("hidden_dtype, weight_dtype", AUTOCAST_DTYPES)
def test_autocast_runs_both_passes_in_its_dtype(hidden_dtype, weight_dtype):
    """Under autocast the GEMMs run in bf16, in the forward and in the backward's
    recompute alike (autocast itself only reaches the forward: a backward recomputing
    fp32 logits against the bf16 logits' log-sum-exp is off by |z| * 2^-9 in every
    probability), and each gradient comes back in its input's dtype. Logits of O(8)."""
    hidden, weight, bias, labels = random_linear_case((29,), 32, 300, bias=True)
    weight = weight * 4
    hidden, weight, bias = hidden.to(hidden_dtype), weight.to(weight_dtype), bias.to(weight_dtype)
    grads = upstream(labels.shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = run_op(hidden, weight, bias, labels, grads)
    refs = bf16_logits_reference(hidden, weight, bias, labels, *grads)
    assert outs[0].dtype == outs[1].dtype == torch.float32
    assert [g.dtype for g in outs[2:]] == [hidden_dtype, weight_dtype, weight_dtype]
    for name, out, ref in zip(NAMES, outs, refs):
        # logp, entropy: fp32 on the same logits; gradients: d logits rounded to bf16
        # (~2e-3; the fp32-logits backward was off by 3e-2 to 5e-2 here)
        tol = 1e-5 if name in ("logp", "entropy") else 1e-2
        assert rel_err(out, ref) < tol, (name, rel_err(out, ref))


def test_autocast_leaves_float64_alone():
    """As F.linear: autocast does not touch fp64 inputs."""
    hidden, weight, bias, labels = random_linear_case((9,), 8, 40)
    grads = upstream(labels.shape)
    plain = run_op(hidden, weight, bias, labels, grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run_op(hidden, weight, bias, labels, grads)
    for name, a, b in zip(NAMES, autocast, plain):
        assert torch.equal(a, b), name


def test_linear_ppo_loss_under_autocast():
    """fp32 model under bf16 autocast: the loss of the bf16 logits, fp32 gradients."""
    hidden, weight, _, labels = random_linear_case((3, 7), 16, 90, bias=False, ignore_frac=0)
    hidden, weight = hidden.float().requires_grad_(), weight.float().requires_grad_()
    old_logp = -torch.rand(3, 7)
    advantages = torch.randn(3, 7)
    mask = torch.rand(3, 7) > 0.2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rlhf_fast.linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask,
                                        entropy_coef=0.01)
    out.loss.backward()
    h, w = hidden.detach().bfloat16(), weight.detach().bfloat16()
    logits = (h @ w.T).double().requires_grad_()
    logp, entropy = reference.logprobs(logits, labels, return_entropy=True)
    ref = reference.ppo_loss(logp, old_logp.double(), advantages.double(), mask,
                             entropy=entropy, entropy_coef=0.01)
    ref.loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    d_logits, h = logits.grad.reshape(-1, 90), h.reshape(-1, 16)
    assert rel_err(hidden.grad.reshape(-1, 16), d_logits @ w.double()) < 1e-2
    assert rel_err(weight.grad, d_logits.T @ h.double()) < 1e-2


def test_wide_accumulation_without_fp32_output_gemms(monkeypatch):
    """Where torch has no fp32-output GEMM (here: the CPU), an fp32 gradient takes the
    bf16 product rounded, added a row slice at a time: the exact sum up to that rounding.
    (Not bitwise the whole product's: the CPU's bf16 GEMM may block a 5-row slice
    otherwise than 37 rows, and round an entry the other way, seed 3822481462.)"""
    assert not kernel.has_fp32_output_gemm(torch.device("cpu"), torch.bfloat16)
    acc = torch.randn(37, 12)
    a, b = torch.randn(37, 20).bfloat16(), torch.randn(20, 12).bfloat16()
    exact = a.double() @ b.double()
    # half a bf16 ulp of the product, and fp32 accumulation over the 20 terms (both ways)
    sums = a.double().abs() @ b.double().abs()
    bound = 2.0 ** -8 * (exact.abs() + 2 * 20 * 2.0 ** -24 * sums) + 2 * 20 * 2.0 ** -24 * sums
    expected = acc.double() + exact
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 12 * 5)  # slices of 5 rows
    kernel.add_product(acc, a, b)
    assert ((acc.double() - expected).abs() <= bound + 1e-6 * expected.abs()).all()
    out = torch.empty(37, 12)
    kernel.product_into(out, a, b)
    assert ((out.double() - exact).abs() <= bound).all()
