"""linear_ppo_loss: the token-wise PPO loss on hidden states, forward and gradient in one
pass over token chunks (the lm head's GEMMs around the fused log-prob and PPO kernels).

Only the token-wise part lives here: the aggregation weights of each token (`token_weight`)
come from the PPO forward's row statistics (`ppo_loss.token_weights`), so the [N, V] logits
are never kept for a backward.
"""

from __future__ import annotations

import torch

from rlhf_fast.kernels import logprobs as logprobs_kernel
from rlhf_fast.kernels import ppo_loss as ppo_kernel
from rlhf_fast.kernels.linear_logprobs import (
    add_product,
    in_dtype,
    lm_head,
    product_into,
    token_chunk,
    zero_ignored_rows,
)


def linear_ppo_forward_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    ref_logp: torch.Tensor | None,
    is_weights: torch.Tensor | None,
    token_weight: torch.Tensor,
    cfg: ppo_kernel.PPOKernelConfig,
    temperature: float,
    ignore_index: int,
    needs_grad: tuple[bool, bool, bool],
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:
    """The token-wise PPO loss's forward and its gradient in one pass over token chunks.

    Per chunk: z_c = h_c W^T + b (GEMM 1), log-probs and entropy (fused kernel), the PPO
    gradient of each token from its weight in the aggregated loss (`token_weight`, flat
    [N]) and the PPO inputs (flat [N]), dz_c over z_c in place (fused kernel), then
    d h_c = dz_c W (GEMM 2, complete: the chunk holds whole vocab rows) and
    d W += dz_c^T h_c (GEMM 3; fp32 accumulation for bf16 / fp16 weights). The GEMMs run
    in `compute_dtype`.

    Returns (logp [N], entropy [N], d hidden, d weight, d bias) for an upstream gradient
    of 1 on the loss, the gradients in their inputs' dtypes or None where `needs_grad`
    (hidden, weight, bias) does not ask.
    """
    needs_hidden, needs_weight, needs_bias = needs_grad
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    logp = torch.empty(n_tokens, dtype=acc_dtype, device=hidden.device)
    entropy = torch.empty_like(logp)
    d_hidden = torch.empty_like(hidden) if needs_hidden else None
    wide = weight.dtype in (torch.float32, torch.float64)
    d_weight = torch.zeros(weight.shape, dtype=weight.dtype if wide else torch.float32,
                           device=weight.device) if needs_weight else None
    d_bias = torch.zeros(vocab, dtype=acc_dtype, device=hidden.device) if needs_bias else None
    weight_c, bias_c = weight.to(compute_dtype), in_dtype(bias, compute_dtype)
    step = token_chunk(vocab)
    for start in range(0, n_tokens, step):
        rows = slice(start, min(start + step, n_tokens))
        hidden_c = hidden[rows].to(compute_dtype)
        logits = lm_head(hidden_c, weight_c, bias_c)
        layout = logprobs_kernel.row_layout(logits)
        chunk_logp, chunk_entropy, _, chunk_stats = logprobs_kernel.logprobs_forward(
            logits, labels[rows], layout, temperature, ignore_index, True
        )
        logp[rows] = chunk_logp
        entropy[rows] = chunk_entropy
        if not any(needs_grad):
            del logits  # before the next chunk's GEMM: one chunk alive, not two
            continue
        g_logp, g_entropy = ppo_kernel.ppo_token_grads(
            token_weight[rows], chunk_logp, old_logp[rows], advantages[rows],
            None if ref_logp is None else ref_logp[rows], cfg,
            None if is_weights is None else is_weights[rows],
        )
        d_logits = logprobs_kernel.logprobs_backward(
            logits, labels[rows], layout, chunk_stats, chunk_entropy, g_logp, g_entropy,
            temperature, ignore_index, inplace=True,
        )
        if needs_hidden:
            product_into(d_hidden[rows], d_logits, weight_c)
        if needs_weight:
            add_product(d_weight, d_logits.T,
                        zero_ignored_rows(hidden_c, labels[rows], ignore_index))
        if needs_bias:
            d_bias += d_logits.sum(0, dtype=acc_dtype)
        del logits, d_logits  # (the same buffer) before the next chunk's GEMM
    return (
        logp, entropy, d_hidden,
        in_dtype(d_weight, weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )
