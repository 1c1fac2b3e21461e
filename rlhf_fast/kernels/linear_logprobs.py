"""Log-probs and entropy from hidden states and the lm_head: logits never stored whole.

Math (h [N, D] hidden states, W [V, D] the lm_head, b [V] its bias, z = (h W^T + b) / T):
the outputs and their gradient dz are those of `rlhf_fast/kernels/logprobs.py` on z, and

    d h = dz W / T        d W = dz^T h / T        d b = sum_n dz / T

(the 1 / T is folded into dz by the log-prob backward kernel).

Design: chunks through cuBLAS GEMMs plus the fused log-prob kernels, never more than
CHUNK_ELEMENTS logits alive at once.

  forward   token chunks of n_c = CHUNK_ELEMENTS // V rows: z_c = h_c W^T + b (one GEMM,
            the logits in the input dtype, as a model's lm_head computes them), then the
            log-prob forward kernel on z_c, which keeps each row's (max, log-sum-exp)
            for the backward.
  backward  vocab chunks of v_c = CHUNK_ELEMENTS // N columns over all N tokens:
            recompute z[:, v] = h W_v^T + b_v, overwrite it in place with dz[:, v] (the
            log-prob backward kernel, given the full rows' saved statistics), then
            d W_v = dz[:, v]^T h, a single GEMM over all tokens (fp32 accumulation inside
            the GEMM, rounded once to W's dtype, no [V, D] fp32 buffer), and
            d h += dz[:, v] W_v into an fp32 [N, D] accumulator. Past N = 2^19 tokens
            (v_c at its floor of MIN_VOCAB_CHUNK columns) the tokens are chunked too, and
            d W_v sums their GEMMs in an fp32 [v_c, D] buffer before its one rounding.

Why this design and not a fully fused blockwise Triton kernel (matmul tiles with an
online logsumexp in registers): the GEMMs are > 99% of the FLOPs, cuBLAS runs them close
to peak on every GPU generation without per-architecture tuning, and the only memory
above the inputs and gradients is one chunk of logits (CHUNK_ELEMENTS, 256 MB in bf16,
whatever N), the [N, D] fp32 accumulator of d h, and O(N D) copies of hidden (cast to
the compute dtype under autocast; with ignored rows zeroed when d W is computed) and, for
fp32 master weights under autocast, W cast to the compute dtype. The fused kernel would
save the chunk's HBM round trip (2 bytes per logit written and read per pass, against
2 D FLOPs per logit per GEMM: under 10% of the GEMM time at D = 4096). It was not
measured against this one: no GPU was available while this was written;
`benchmarks/bench_linear_logprobs.py` puts both the GEMM rate and this op's rate side by
side to make that call.

Precision: the GEMMs run in one compute dtype (the caller's: hidden's, or autocast's,
as F.linear picks it); hidden, weight and bias are cast to it (weight once per forward,
a vocab chunk at a time in the backward), and the gradients come back in each input's
own dtype. A gradient wider than the compute dtype (d weight of fp32 master weights
under bf16 autocast, d hidden of an fp32 residual stream) takes the bf16 / fp16 GEMMs'
products unrounded: fp32-output GEMMs where torch has them for the device (CUDA, torch
>= 2.8), else the products are rounded to the compute dtype first, as eager autocast
rounds them.

Cost: 4 GEMMs of 2 N V D FLOPs (forward 1; backward 3: recompute, d W, d h). The fused
losses in `rlhf_fast.ops.linear_logprobs` that know the upstream gradient in the forward
skip the recompute (3 GEMMs).

Batch invariance: none claimed. cuBLAS picks its algorithm (and split-K) from the GEMM
shape, so a token's logits, hence its outputs, may differ in the last bits with N and
with the chunk it falls in.
"""

from __future__ import annotations

import functools

import torch

from rlhf_fast.kernels import logprobs as logprobs_kernel
from rlhf_fast.reference import ignored_labels

#: Logits computed at once, in elements: 256 MB in bf16 (2^27 * 2 bytes).
CHUNK_ELEMENTS = 1 << 27
#: Smallest vocab chunk of the backward (a multiple of every GEMM tile).
MIN_VOCAB_CHUNK = 256
LOW_PRECISION = (torch.bfloat16, torch.float16)


def token_chunk(vocab: int) -> int:
    """Rows of logits the forward computes at once."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def vocab_chunk(n_tokens: int) -> int:
    """Columns of logits the backward computes at once (a multiple of MIN_VOCAB_CHUNK)."""
    columns = CHUNK_ELEMENTS // max(n_tokens, 1)
    return max(MIN_VOCAB_CHUNK, columns - columns % MIN_VOCAB_CHUNK)


def backward_token_chunk(n_tokens: int) -> int:
    """Rows of each backward chunk: all N tokens, unless even MIN_VOCAB_CHUNK columns of
    them pass CHUNK_ELEMENTS (N > 2^19 at the defaults); then as many as fit."""
    return max(1, min(n_tokens, CHUNK_ELEMENTS // vocab_chunk(n_tokens)))


def lm_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """hidden [n, D] @ weight[v, D]^T (+ bias [v]): [n, v] logits in the input dtype."""
    if bias is None:
        return hidden @ weight.T
    return torch.addmm(bias, hidden, weight.T)


def zero_ignored_rows(
    hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """hidden with the rows of ignored tokens zeroed: their d logits rows are 0, but
    0 * NaN is NaN, so a NaN hidden state at padding (attention over a fully masked row
    makes them) would reach d weight = d logits^T hidden. Compared as the kernels do, in
    int64 (`reference.ignored_labels`)."""
    return hidden.masked_fill(ignored_labels(labels, ignore_index).unsqueeze(-1), 0)


@functools.cache
def has_fp32_output_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch multiplies `dtype` matrices into an fp32 result on `device` without
    rounding the product to `dtype` (``torch.mm(..., out_dtype=torch.float32)``: CUDA,
    torch >= 2.8). Probed once per device: the call forms used here, on a tiny case."""
    if dtype not in LOW_PRECISION:
        return False
    with torch.autocast(device.type, enabled=False):
        a = torch.linspace(-2, 2, 64, device=device).reshape(8, 8).to(dtype)
        exact = a.float() @ a.float()
        try:
            product = torch.empty(8, 8, device=device)
            torch.mm(a, a, out_dtype=torch.float32, out=product)
            total = torch.ones(8, 8, device=device)
            torch.addmm(total, a, a, out_dtype=torch.float32, out=total)
        except (RuntimeError, NotImplementedError, TypeError):
            return False
        return bool(torch.allclose(product, exact) and torch.allclose(total, exact + 1))


def _wide_gemm(out: torch.Tensor, a: torch.Tensor) -> bool:
    return out.dtype == torch.float32 and has_fp32_output_gemm(a.device, a.dtype)


def product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, for an `out` as wide as or wider than a and b (see the precision note
    above: unrounded where the device has fp32-output GEMMs)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif _wide_gemm(out, a):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        out.copy_(a @ b)


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, for an `acc` as wide as or wider than a and b (unrounded where the
    device has fp32-output GEMMs). Elsewhere the rounded product is added in row slices,
    so it never exists whole (a [V, D] bf16 product is another GB at V = 128256,
    D = 4096)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif _wide_gemm(acc, a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        step = max(1, CHUNK_ELEMENTS // max(acc.shape[1], 1))
        for start in range(0, acc.shape[0], step):
            acc[start:start + step] += a[start:start + step] @ b


def in_dtype(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    compute_entropy: bool,
    compute_sum_p2: bool,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Forward on contiguous ``hidden [N, D]``, ``weight [V, D]``, labels [N], the GEMMs
    in `compute_dtype`.

    Returns (logp [N], entropy [N] or None, log_sum_p2 [N] or None, row_stats [2, N]),
    fp32 (fp64 for an fp64 compute dtype), as `kernels.logprobs.logprobs_forward` on the
    full logits.
    """
    n_tokens = hidden.shape[0]
    dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    logp = torch.empty(n_tokens, dtype=dtype, device=hidden.device)
    entropy = torch.empty_like(logp) if compute_entropy else None
    sum_p2 = torch.empty_like(logp) if compute_sum_p2 else None
    row_stats = torch.empty(2, n_tokens, dtype=dtype, device=hidden.device)
    weight, bias = weight.to(compute_dtype), in_dtype(bias, compute_dtype)
    step = token_chunk(weight.shape[0])
    for start in range(0, n_tokens, step):
        rows = slice(start, min(start + step, n_tokens))
        logits = lm_head(hidden[rows].to(compute_dtype), weight, bias)
        chunk_logp, chunk_entropy, chunk_sum_p2, chunk_stats = logprobs_kernel.logprobs_forward(
            logits, labels[rows], logprobs_kernel.row_layout(logits), temperature,
            ignore_index, compute_entropy, compute_sum_p2,
        )
        logp[rows] = chunk_logp
        row_stats[:, rows] = chunk_stats
        if compute_entropy:
            entropy[rows] = chunk_entropy
        if compute_sum_p2:
            sum_p2[rows] = chunk_sum_p2
        del logits  # before the next chunk's GEMM: one chunk alive, not two
    return logp, entropy, sum_p2, row_stats


def linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    row_stats: torch.Tensor,
    entropy: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    needs_grad: tuple[bool, bool, bool],
    compute_dtype: torch.dtype,
    log_sum_p2: torch.Tensor | None = None,
    g_sum_p2: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d hidden, d weight, d bias), each in its input's dtype where `needs_grad` asks for
    it (else None), from the upstream gradients of logp, entropy and log_sum_p2 (flat
    [N], or None; `log_sum_p2` is the forward's output, read with `g_sum_p2`)."""
    needs_hidden, needs_weight, needs_bias = needs_grad
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    d_hidden = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device) \
        if needs_hidden else None
    d_weight = torch.empty_like(weight) if needs_weight else None
    d_bias = torch.empty(vocab, dtype=acc_dtype, device=hidden.device) if needs_bias else None
    if n_tokens == 0:
        for grad in (d_weight, d_bias):
            if grad is not None:
                grad.zero_()
    output_dtype = hidden.dtype
    hidden = hidden.to(compute_dtype)
    if needs_weight:  # d hidden rows of ignored tokens are 0 * W: no copy needed for it
        hidden = zero_ignored_rows(hidden, labels, ignore_index)
    step, row_step = vocab_chunk(n_tokens), backward_token_chunk(n_tokens)
    for start in range(0, vocab if n_tokens else 0, step):
        cols = slice(start, min(start + step, vocab))
        w = weight[cols].to(compute_dtype)
        b = None if bias is None else bias[cols].to(compute_dtype)
        # Past 2^19 tokens the columns' d weight sums several token chunks: in fp32.
        d_w = None
        if needs_weight and row_step < n_tokens:
            d_w = torch.zeros(w.shape, dtype=acc_dtype, device=w.device)
        if needs_bias:
            d_bias[cols] = 0
        for row_start in range(0, n_tokens, row_step):
            rows = slice(row_start, min(row_start + row_step, n_tokens))
            logits = lm_head(hidden[rows], w, b)
            d_logits = logprobs_kernel.logprobs_backward(
                logits, labels[rows], logprobs_kernel.row_layout(logits), row_stats[:, rows],
                None if entropy is None else entropy[rows],
                None if g_logp is None else g_logp[rows],
                None if g_entropy is None else g_entropy[rows],
                temperature, ignore_index, inplace=True, label_shift=start,
                log_sum_p2=None if g_sum_p2 is None else log_sum_p2[rows],
                g_sum_p2=None if g_sum_p2 is None else g_sum_p2[rows],
            )
            if d_w is not None:
                add_product(d_w, d_logits.T, hidden[rows])
            elif needs_weight:
                product_into(d_weight[cols], d_logits.T, hidden)
            if needs_hidden:
                add_product(d_hidden[rows], d_logits, w)
            if needs_bias:
                d_bias[cols] += d_logits.sum(0, dtype=acc_dtype)
            del logits, d_logits  # (the same buffer) before the next chunk's GEMM
        if d_w is not None:
            d_weight[cols] = d_w
    return (
        in_dtype(d_hidden, output_dtype),
        d_weight,
        None if d_bias is None else d_bias.to(bias.dtype),
    )
