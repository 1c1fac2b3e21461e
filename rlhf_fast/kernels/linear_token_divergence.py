"""A student's divergence from a teacher from both models' hidden states and lm_heads: the
[N, V] logits of neither model ever stored whole.

Math: that of `rlhf_fast/kernels/token_divergence.py` on z_s = h_s W_s^T + b_s and
z_t = h_t W_t^T + b_t, and for the student's lm_head, with dz the divergence's gradient
w.r.t. z_s (the 1 / T folded in by its backward kernel):

    d h_s = dz W_s        d W_s = dz^T h_s        d b_s = sum_n dz

Design: `rlhf_fast/kernels/linear_logprobs.py`'s, with two logits chunks alive at a time
(the student's and the teacher's, each half of CHUNK_ELEMENTS, so never more than
CHUNK_ELEMENTS logits in all).

  forward   token chunks: z_s and z_t of n_c rows (two GEMMs), the divergence forward
            kernel on the pair, which keeps each row's statistics for the backward.
  backward  vocab chunks of v_c columns over all N tokens: recompute both slices (two
            GEMMs), overwrite the student's with dz (the backward kernel needs only the
            full rows' saved statistics and the slice), then d W_s[v] = dz^T h_s (one
            GEMM over all tokens, rounded once) and d h_s += dz W_s[v] (fp32 [N, D]).
            Past 2^18 tokens the tokens are chunked too, and d W_s[v] sums their GEMMs in
            fp32 before its one rounding.

Cost: the forward 2 GEMMs of 2 N V D FLOPs (D each model's hidden size), the backward 4
(two recomputes, d W_s, d h_s); the teacher's gradient is never formed. Precision and
batch invariance: as `linear_logprobs` (each model's GEMMs in its own compute dtype;
cuBLAS picks algorithms by shape, so no batch invariance is claimed).
"""

from __future__ import annotations

import torch

from rlhf_fast.kernels import token_divergence as divergence_kernel
from rlhf_fast.kernels.linear_logprobs import (
    CHUNK_ELEMENTS,
    MIN_VOCAB_CHUNK,
    add_product,
    in_dtype,
    lm_head,
    product_into,
)
from rlhf_fast.kernels.logprobs import row_layout

#: Logits of each model alive at once: the two together CHUNK_ELEMENTS.
PAIR_CHUNK = CHUNK_ELEMENTS // 2

Head = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype]
"""One model's (hidden [N, D], weight [V, D], bias [V] or None, compute dtype)."""


def _logits(head: Head, rows: slice, cols: slice | None = None) -> torch.Tensor:
    hidden, weight, bias, dtype = head
    if cols is not None:
        weight, bias = weight[cols], None if bias is None else bias[cols]
    return lm_head(hidden[rows].to(dtype), weight.to(dtype), in_dtype(bias, dtype))


def _pair_layouts(logits: torch.Tensor) -> tuple:
    layout = row_layout(logits)
    return layout, layout


def linear_divergence_forward(
    student: Head, teacher: Head, rows: torch.Tensor | None, code: int, temperature: float,
    beta: float, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on contiguous hidden states [N, D_s] / [N, D_t] and lm_heads [V, D]: returns
    (divergence [N], stats [N_STATS, N]) as `token_divergence`'s kernels on the full
    logits (fp32, fp64 when a compute dtype is fp64)."""
    n_tokens, vocab = student[0].shape[0], student[1].shape[0]
    fp64 = torch.float64 in (student[3], teacher[3])
    dtype = torch.float64 if fp64 else torch.float32
    value = torch.empty(n_tokens, dtype=dtype, device=student[0].device)
    stats = torch.empty(divergence_kernel.N_STATS, n_tokens, dtype=dtype,
                        device=student[0].device)
    # each lm_head cast once per pass, not per chunk
    student = (student[0], student[1].to(student[3]), in_dtype(student[2], student[3]),
               student[3])
    teacher = (teacher[0], teacher[1].to(teacher[3]), in_dtype(teacher[2], teacher[3]),
               teacher[3])
    step = max(1, PAIR_CHUNK // max(vocab, 1))
    for start in range(0, n_tokens, step):
        chunk = slice(start, min(start + step, n_tokens))
        z_s, z_t = _logits(student, chunk), _logits(teacher, chunk)
        value[chunk], stats[:, chunk] = divergence_kernel.divergence_forward(
            z_s, z_t, None if rows is None else rows[chunk], _pair_layouts(z_s), code,
            temperature, beta, ignore_index)
        del z_s, z_t  # before the next chunk's GEMMs: one pair alive
    return value, stats


def backward_chunks(n_tokens: int) -> tuple[int, int]:
    """(columns, rows) of each backward chunk: all N rows and as many columns (a multiple
    of MIN_VOCAB_CHUNK) as PAIR_CHUNK allows, or fewer rows past 2^18 tokens."""
    columns = PAIR_CHUNK // max(n_tokens, 1)
    columns = max(MIN_VOCAB_CHUNK, columns - columns % MIN_VOCAB_CHUNK)
    return columns, max(1, min(n_tokens, PAIR_CHUNK // columns))


def linear_divergence_backward(
    student: Head, teacher: Head, rows: torch.Tensor | None, kept: torch.Tensor,
    stats: torch.Tensor, g: torch.Tensor, code: int, temperature: float, beta: float,
    ignore_index: int, needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d student hidden, d student weight, d student bias), each in its input's dtype
    where `needs_grad` asks for it (else None), from the upstream gradient `g` [N]; `kept`
    [N] bool marks the rows counted."""
    needs_hidden, needs_weight, needs_bias = needs_grad
    hidden, weight, bias, compute_dtype = student
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    d_hidden = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device) \
        if needs_hidden else None
    d_weight = torch.empty_like(weight) if needs_weight else None
    d_bias = torch.zeros(vocab, dtype=acc_dtype, device=hidden.device) if needs_bias else None
    if n_tokens == 0 and d_weight is not None:
        d_weight.zero_()
    output_dtype = hidden.dtype
    hidden = hidden.to(compute_dtype)
    if needs_weight:  # rows not counted: d z is 0 there, but 0 * NaN (padding) is NaN
        hidden = hidden.masked_fill(~kept.unsqueeze(-1), 0)
    student = (hidden, weight, bias, compute_dtype)
    step, row_step = backward_chunks(n_tokens)
    for start in range(0, vocab if n_tokens else 0, step):
        cols = slice(start, min(start + step, vocab))
        w = weight[cols].to(compute_dtype)
        d_w = None  # past 2^18 tokens d W of the columns sums several token chunks
        if needs_weight and row_step < n_tokens:
            d_w = torch.zeros(w.shape, dtype=acc_dtype, device=w.device)
        for row_start in range(0, n_tokens, row_step):
            chunk = slice(row_start, min(row_start + row_step, n_tokens))
            z_s, z_t = _logits(student, chunk, cols), _logits(teacher, chunk, cols)
            d_z = divergence_kernel.divergence_backward(
                z_s, z_t, None if rows is None else rows[chunk], _pair_layouts(z_s),
                stats[:, chunk].contiguous(), g[chunk], code, temperature, beta, ignore_index,
                inplace=True)
            del z_t
            if d_w is not None:
                add_product(d_w, d_z.T, hidden[chunk])
            elif needs_weight:
                product_into(d_weight[cols], d_z.T, hidden)
            if needs_hidden:
                add_product(d_hidden[chunk], d_z, w)
            if needs_bias:
                d_bias[cols] += d_z.sum(0, dtype=acc_dtype)
            del z_s, d_z  # (the same buffer) before the next chunk's GEMMs
        if d_w is not None:
            d_weight[cols] = d_w
    return (in_dtype(d_hidden, output_dtype), d_weight,
            None if d_bias is None else d_bias.to(bias.dtype))
