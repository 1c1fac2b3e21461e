"""Plain PyTorch versions of every rlhf-fast op.

This module is the specification: each function here has the same signature and the
same semantics as the public op of the same name, written as plainly as a textbook.
It is the oracle the tests compare the Triton kernels against (in float64), and the
CPU fallback the trainers use when Triton cannot run. Readable first, fast second.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in fp32 whatever the input, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under softmax(logits / temperature), and entropy.

    Args:
        logits: ``[..., V]`` float tensor.
        labels: ``[...]`` integer tensor of token ids in ``[0, V)`` or ``ignore_index``.
        temperature: z = logits / temperature.
        ignore_index: label value whose row gives log-prob 0, entropy 0, no gradient.
        return_entropy: also return H = -sum_j p_j log p_j.

    Returns:
        ``logp [...]`` (and ``entropy [...]``) in fp32 (fp64 for fp64 logits).

    Semantics the kernels share:
      * logp = z[label] - logsumexp(z); H = logsumexp(z) - sum_j p_j z_j.
      * A logit of -inf is a token of probability 0: it adds nothing to the entropy.
      * A row whose label is ``ignore_index`` gives logp = 0 and H = 0, and no gradient
        flows into its logits from either output.
      * A row whose label is outside [0, V) (and not ignore_index) gives NaN for both.
      * NaN or +inf anywhere in a row gives NaN for that row only.
    """
    vocab = logits.shape[-1]
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    safe_labels = torch.where(in_range, labels, torch.zeros_like(labels))

    z = logits.to(_compute_dtype(logits.dtype)) / temperature
    # Ignored rows are never looked at: whatever they hold, no NaN reaches any output.
    z = torch.where(ignored.unsqueeze(-1), torch.zeros_like(z), z)
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    p = log_p.exp()
    # p * log p is 0 where p is 0 (a -inf logit), not 0 * -inf = NaN, in value and gradient.
    log_p_or_zero = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    entropy = -(p * log_p_or_zero).sum(-1)

    nan = torch.full_like(logp, float("nan"))
    logp = torch.where(in_range, logp, nan)
    entropy = torch.where(in_range, entropy, nan)
    # Ignored rows: a constant 0, so no gradient reaches their logits.
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    if return_entropy:
        return logp, entropy
    return logp
