"""linear_ppo_loss: the token-wise PPO loss on hidden states, forward and gradient in one
pass over token chunks (the lm head's GEMMs around the fused log-prob and PPO kernels).

Only the token-wise part lives here. Each token's weight w in the aggregated loss
(`token_weights`: `ppo_loss`'s w of its row, 0 when masked) is known from the mask alone,
so a chunk's PPO gradient is taken as soon as its log-probs exist, and the [N, V] logits
are never kept for a backward. With the per-token terms of `ppo_terms`:

    d loss / d logp_t = w_t (d pg_t / d logp_t [times the IS weight] + kl_coef d kl_t / d logp_t)
    d loss / d H_t    = -entropy_coef w_t

(token losses only: a sequence loss, or kl_cov, needs the whole batch first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels import logprobs as logprobs_kernel
from rlhf_fast.kernels.common import fp64_arg
from rlhf_fast.kernels.linear_logprobs import (
    add_product,
    in_dtype,
    lm_head,
    product_into,
    token_chunk,
    zero_ignored_rows,
)
from rlhf_fast.kernels.ppo_terms import (
    AGG_CODES,
    POLICY_CODES,
    POLICY_SETTINGS,
    PPOKernelConfig,
    policy_settings,
    tile_kl_terms,
    weighted_policy_terms,
)


@triton.jit
def _ppo_token_grad_kernel(
    token_weight_ptr, logp_ptr, old_logp_ptr, adv_ptr, ref_ptr, is_w_ptr, d_logp_ptr,
    d_ent_ptr,
    n_tokens, clip_low_hi, clip_low_lo, clip_high_hi, clip_high_lo,
    param_a_hi, param_a_lo, param_b_hi, param_b_lo,
    kl_coef_hi, kl_coef_lo, entropy_coef_hi, entropy_coef_lo,
    POLICY: tl.constexpr, KL_EST: tl.constexpr, KL_RATIO: tl.constexpr, HAS_IS: tl.constexpr,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    # d loss / d logp and d loss / d entropy of single tokens, given each token's
    # aggregation weight w (0 for masked tokens): the fused linear_ppo_loss calls this on a
    # chunk of tokens as soon as their log-probs exist, before the rest of the batch does
    # (token losses only: a sequence loss needs its whole row first).
    acc_dtype = tl.float64 if FP64 else tl.float32
    clip_low, clip_high, param_a, param_b = policy_settings(
        clip_low_hi, clip_low_lo, clip_high_hi, clip_high_lo, param_a_hi, param_a_lo,
        param_b_hi, param_b_lo, FP64)
    kl_coef = fp64_arg(kl_coef_hi, kl_coef_lo, acc_dtype)
    entropy_coef = fp64_arg(entropy_coef_hi, entropy_coef_lo, acc_dtype)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n_tokens
    w = tl.load(token_weight_ptr + offs, mask=in_range, other=0.0).to(acc_dtype)
    valid = w != 0
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    old_logp = tl.load(old_logp_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    # (no kl_cov here: its coefficients' pointer, never read, is is_w_ptr)
    log_ratio, ratio, pg, d_logp, low, high, dual = weighted_policy_terms(
        logp, old_logp, adv, 0.0, offs, valid, is_w_ptr, is_w_ptr, clip_low, clip_high,
        param_a, param_b, POLICY, HAS_IS,
    )
    if KL_EST != 0:
        kl, d_kl = tile_kl_terms(ref_ptr, offs, valid, logp, ratio, KL_EST, KL_RATIO)
        d_logp += kl_coef * d_kl
    tl.store(d_logp_ptr + offs, tl.where(valid, w * d_logp, 0.0), mask=in_range)
    tl.store(d_ent_ptr + offs, tl.where(valid, -entropy_coef * w, 0.0), mask=in_range)


TOKEN_GRAD_BLOCK = 1024


def token_weights(mask: torch.Tensor, cfg: PPOKernelConfig, dtype: torch.dtype
                  ) -> torch.Tensor:
    """The weight of each token in the aggregated loss, ``[B, T]`` in `dtype`: the
    per-row w of `ppo_loss`'s docstring on valid tokens, 0 on masked ones."""
    valid = (mask != 0).to(dtype)
    row_counts = valid.sum(-1, keepdim=True)
    n_seqs = cfg.seq_count or (row_counts > 0).sum().to(dtype)
    if cfg.agg_code == AGG_CODES["token-mean"]:
        denominator = cfg.token_count or row_counts.sum()
    elif cfg.agg_code == AGG_CODES["seq-mean-token-sum-norm"]:
        denominator = torch.tensor(cfg.norm_count(*mask.shape), dtype=dtype,
                                   device=mask.device)
    elif cfg.agg_code == AGG_CODES["token-sum"]:
        denominator = 1.0
    else:
        denominator = n_seqs
    weight = cfg.dp_size / torch.as_tensor(denominator, dtype=dtype, device=mask.device
                                           ).clamp(min=1)
    if cfg.agg_code == AGG_CODES["seq-mean-token-mean"]:
        weight = weight / row_counts.clamp(min=1)
    return valid * weight


def ppo_token_grads(
    token_weight, logp, old_logp, advantages, ref_logp, cfg, is_weights=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d logp, d loss / d entropy) of flat contiguous [n] tokens, for an upstream
    gradient of 1 on `loss`, in token_weight's dtype. `token_weight` from `token_weights`.
    Token losses only (not `cfg.is_sequence_loss`, not kl_cov)."""
    assert not cfg.is_sequence_loss, "a sequence loss needs its whole rows: ppo_backward"
    assert cfg.policy_code != POLICY_CODES["kl_cov"], "kl_cov reads the batch's covariance"
    n_tokens = logp.numel()
    d_logp = torch.empty_like(token_weight)
    d_ent = torch.empty_like(token_weight)
    if n_tokens == 0:
        return d_logp, d_ent
    _ppo_token_grad_kernel[(triton.cdiv(n_tokens, TOKEN_GRAD_BLOCK),)](
        token_weight, logp, old_logp, advantages, logp if ref_logp is None else ref_logp,
        logp if is_weights is None else is_weights, d_logp, d_ent, n_tokens,
        *cfg.fp64_args(*POLICY_SETTINGS, "kl_coef", "entropy_coef"),
        POLICY=cfg.policy_code,
        KL_EST=cfg.kl_code if ref_logp is not None else 0, KL_RATIO=cfg.kl_ratio,
        HAS_IS=is_weights is not None,
        FP64=token_weight.dtype == torch.float64, BLOCK=TOKEN_GRAD_BLOCK, num_warps=4,
    )
    return d_logp, d_ent


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
    cfg: PPOKernelConfig,
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
        g_logp, g_entropy = ppo_token_grads(
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
