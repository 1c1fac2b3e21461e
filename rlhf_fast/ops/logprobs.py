"""`rlhf_fast.logprobs`: per-token log-probs (and entropy) from logits, fused."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
from torch.autograd.graph import increment_version

from rlhf_fast import reference
from rlhf_fast.kernels import logprobs as kernel
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_bool,
    check_inplace_backward,
    check_same_device,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.options import LOGPROB_OPTIONS, TOKEN_OPTIONS


class LogProbsFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels. Inputs are validated by `logprobs`."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy, return_sum_p2,
                inplace_backward):
        layout = kernel.row_layout(logits)
        if layout is None:  # more than two unmergeable leading dims: address a copy
            logits = logits.contiguous()
            # An empty tensor counts as contiguous whatever its strides, so contiguous()
            # returns it as it is; with no row to address, any layout will do.
            layout = kernel.row_layout(logits) if logits.numel() else (1, 0, 0)
        # The kernels read label `row` at labels_ptr + row: a strided or expand()ed view
        # (which reshape keeps as a view where it can) would be read at the wrong places.
        flat_labels = labels.reshape(-1).contiguous()
        logp, entropy, sum_p2, row_stats = kernel.logprobs_forward(
            logits, flat_labels, layout, temperature, ignore_index, return_entropy,
            return_sum_p2,
        )
        ctx.save_for_backward(logits, flat_labels, row_stats, entropy, sum_p2)
        ctx.layout = layout
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        ctx.returned = (True, return_entropy, return_sum_p2)
        ctx.set_materialize_grads(False)
        return tuple(out.view(labels.shape) for out in (logp, entropy, sum_p2) if out is not None)

    @staticmethod
    @differentiable_once
    def backward(ctx, *grads):
        logits, labels, row_stats, entropy, sum_p2 = ctx.saved_tensors
        g_logp, g_entropy, g_sum_p2 = upstream_grads(ctx.returned, grads)
        if g_logp is None and g_entropy is None and g_sum_p2 is None:
            return None, None, None, None, None, None, None
        grad = kernel.logprobs_backward(
            logits,
            labels,
            ctx.layout,
            row_stats,
            entropy,
            None if g_logp is None else g_logp.reshape(-1).contiguous(),
            None if g_entropy is None else g_entropy.reshape(-1).contiguous(),
            ctx.temperature,
            ctx.ignore_index,
            ctx.inplace_backward,
            log_sum_p2=sum_p2,
            g_sum_p2=None if g_sum_p2 is None else g_sum_p2.reshape(-1).contiguous(),
        )
        if ctx.inplace_backward:
            # The logits now hold their gradient: tell autograd, so that anything that
            # saved them (a second backward through this op, say) raises instead of
            # reading the gradient as logits.
            increment_version(logits)
        return grad, None, None, None, None, None, None


def upstream_grads(returned: tuple[bool, ...], grads: tuple) -> list:
    """The upstream gradient of each possible output (logp, entropy, log_sum_p2), None for
    those not returned: autograd passes one per returned output, in order."""
    given = iter(grads)
    return [next(given) if was_returned else None for was_returned in returned]


def single_or_tuple(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    return outputs[0] if len(outputs) == 1 else outputs


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    # not `labels != ignore_index`: torch compares int32 labels with it modulo 2^32
    ignored = reference.ignored_labels(labels, ignore_index)
    bad = ~ignored & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, found {value}"
        )


def check_logprob_options(options: Mapping[str, Any], like: torch.Tensor) -> SimpleNamespace:
    """`LOGPROB_OPTIONS` checked, check_labels' default resolved for `like`'s device: on for
    CPU tensors, off for CUDA ones (the range check needs a device sync there)."""
    opt = LOGPROB_OPTIONS.check(options)
    if opt.check_labels is None:
        opt.check_labels = not like.is_cuda
    return opt


@LOGPROB_OPTIONS.keywords
def logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, return_entropy: bool = False,
    return_sum_p2: bool = False, inplace_backward: bool = False, **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Log-probability of each label under softmax(logits / temperature), and its entropy.

    One read of the logits in the forward, one read and one write in the backward; no
    fp32 copy of the logits is ever made.

    Args:
        logits: ``[..., V]`` bf16, fp16, fp32 (or fp64, computed in fp64). Any leading
            shape; the last dim must have stride 1. Row-strided views such as
            ``logits[:, :-1]`` are read in place, without a copy.
        labels: ``[...]`` (the leading shape of ``logits``) int64 or int32 token ids in
            ``[0, V)``, or ``ignore_index``; any layout (a non-contiguous one is copied,
            N ints).
        return_entropy: (bool) also return the entropy of each row's distribution;
            gradients from every output flow back in one pass.
        return_sum_p2: (bool) also return log sum_j p_j^2 of each row (what verl's
            optimal token baseline and TRL's WPO weighting read), from the same pass.
        inplace_backward: (bool) write the gradient into the logits' storage instead of a new
            tensor, so the backward allocates nothing of size N*V. The logits are
            overwritten: use it only when nothing else needs them afterwards. Logits
            that are a leaf requiring grad, or a view of one, raise ValueError (their
            values would become their gradient): pass an op's output, e.g. the
            lm_head's. Through a slice view (``logits[:, :-1]``) autograd's slice
            backward still allocates a full-size gradient: shift the labels instead (pad
            them with ignore_index).
        Options: below.

    Returns:
        ``logp [...]``, or a tuple of it followed by ``entropy [...]`` (with
        ``return_entropy``) and ``log_sum_p2 [...]`` (with ``return_sum_p2``); fp32
        (fp64 for fp64 logits); ignored rows give 0 for each. A NaN or inf in a row
        gives NaN for that row only; -inf logits are tokens of probability 0.
    """
    check_tensor("logits", logits, FLOAT_DTYPES)
    check_tensor("labels", labels, INDEX_DTYPES)
    check_same_device("labels", labels, "logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), "
            f"got {tuple(labels.shape)}"
        )
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(
            f"logits must have stride 1 in its last dim, got stride {logits.stride(-1)}; "
            "call .contiguous() first"
        )
    return_entropy = check_bool("return_entropy", return_entropy)
    return_sum_p2 = check_bool("return_sum_p2", return_sum_p2)
    inplace_backward = check_bool("inplace_backward", inplace_backward)
    opt = check_logprob_options(options, logits)
    if opt.check_labels:
        check_label_range(labels, logits.shape[-1], opt.ignore_index)

    if inplace_backward:
        check_inplace_backward("logits", logits)
    if not use_triton(logits):
        return reference.logprobs(
            logits, labels, return_entropy=return_entropy, return_sum_p2=return_sum_p2,
            **TOKEN_OPTIONS.pick(opt),
        )
    return single_or_tuple(LogProbsFunction.apply(
        logits, labels, opt.temperature, opt.ignore_index, return_entropy, return_sum_p2,
        inplace_backward,
    ))
