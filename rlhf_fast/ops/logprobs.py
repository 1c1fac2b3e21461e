"""`rlhf_fast.logprobs`: per-token log-probs (and entropy) from logits, fused."""

from __future__ import annotations

from collections.abc import Mapping
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
    host_checks_by_default,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import empty_like_absent, kernel_op
from rlhf_fast.options import LOGPROB_OPTIONS, TOKEN_OPTIONS, Checked


def addressed(logits: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """`logits` and the row layout the kernels address it by: itself where its rows merge
    into at most two strided dims (``logits[:, :-1]`` does), else a contiguous copy."""
    layout = kernel.row_layout(logits)
    if layout is None:
        logits = logits.contiguous()
        # An empty tensor counts as contiguous whatever its strides, so contiguous()
        # returns it as it is; with no row to address, any layout will do.
        layout = kernel.row_layout(logits) if logits.numel() else (1, 0, 0)
    return logits, layout


def flat(labels: torch.Tensor) -> torch.Tensor:
    # The kernels read label `row` at labels_ptr + row: a strided or expand()ed view
    # (which reshape keeps as a view where it can) would be read at the wrong places.
    return labels.reshape(-1).contiguous()


@kernel_op("logprobs")
def logprobs_op(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
    return_entropy: bool, return_sum_p2: bool, inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, log_sum_p2, row_stats): the first three in labels' shape (the two
    not asked for empty), fp32 (fp64 for fp64 logits); row_stats ``[2, N]`` each row's max
    and log-sum-exp below it, for the backward. `inplace_backward` is read by the
    backward only."""
    logits, layout = addressed(logits)
    logp, entropy, sum_p2, row_stats = kernel.logprobs_forward(
        logits, flat(labels), layout, temperature, ignore_index, return_entropy,
        return_sum_p2)
    entropy = empty_like_absent(logp) if entropy is None else entropy.view(labels.shape)
    sum_p2 = empty_like_absent(logp) if sum_p2 is None else sum_p2.view(labels.shape)
    return logp.view(labels.shape), entropy, sum_p2, row_stats


@logprobs_op.register_fake
def _(logits, labels, temperature, ignore_index, return_entropy, return_sum_p2,
      inplace_backward):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32

    def output(asked: bool) -> torch.Tensor:
        return logits.new_empty(labels.shape if asked else (0,), dtype=dtype)

    return (output(True), output(return_entropy), output(return_sum_p2),
            logits.new_empty((2, labels.numel()), dtype=dtype))


def _launch_backward(logits, labels, row_stats, entropy, log_sum_p2, g_logp, g_entropy,
                     g_sum_p2, temperature, ignore_index, inplace):
    logits, layout = addressed(logits)
    return kernel.logprobs_backward(
        logits, flat(labels), layout, row_stats, entropy,
        None if g_logp is None else flat(g_logp),
        None if g_entropy is None else flat(g_entropy), temperature, ignore_index, inplace,
        log_sum_p2=log_sum_p2, g_sum_p2=None if g_sum_p2 is None else flat(g_sum_p2))


@kernel_op("logprobs_backward")
def logprobs_backward_op(
    logits: torch.Tensor, labels: torch.Tensor, row_stats: torch.Tensor,
    entropy: torch.Tensor, log_sum_p2: torch.Tensor, g_logp: torch.Tensor | None,
    g_entropy: torch.Tensor | None, g_sum_p2: torch.Tensor | None, temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """d loss / d logits (a new tensor of logits' shape and dtype) from the forward's
    outputs and their upstream gradients (None: that output unused)."""
    return _launch_backward(logits, labels, row_stats, entropy, log_sum_p2, g_logp,
                            g_entropy, g_sum_p2, temperature, ignore_index, False)


@logprobs_backward_op.register_fake
def _(logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@kernel_op("logprobs_backward_", mutates_args=("logits",))
def logprobs_backward_inplace_op(
    logits: torch.Tensor, labels: torch.Tensor, row_stats: torch.Tensor,
    entropy: torch.Tensor, log_sum_p2: torch.Tensor, g_logp: torch.Tensor | None,
    g_entropy: torch.Tensor | None, g_sum_p2: torch.Tensor | None, temperature: float,
    ignore_index: int,
) -> None:
    """`logprobs_backward`, written into `logits` (nothing of its size allocated)."""
    grad = _launch_backward(logits, labels, row_stats, entropy, log_sum_p2, g_logp,
                            g_entropy, g_sum_p2, temperature, ignore_index, True)
    if grad.data_ptr() != logits.data_ptr():  # rows no layout addresses: a copy's
        logits.copy_(grad)


def _setup_logprobs(ctx, inputs, output):
    logits, labels, ctx.temperature, ctx.ignore_index, return_entropy, return_sum_p2, \
        ctx.inplace_backward = inputs
    _, entropy, sum_p2, row_stats = output
    ctx.save_for_backward(logits, labels, row_stats, entropy, sum_p2)
    ctx.returned = (True, return_entropy, return_sum_p2)
    ctx.mark_non_differentiable(row_stats)


@differentiable_once
def _logprobs_backward(ctx, *grads):
    logits, labels, row_stats, entropy, sum_p2 = ctx.saved_tensors
    g_logp, g_entropy, g_sum_p2 = (g if was else None for g, was in zip(grads, ctx.returned))
    if g_logp is None and g_entropy is None and g_sum_p2 is None:
        return None, None, None, None, None, None, None
    args = (logits, labels, row_stats, entropy, sum_p2, g_logp, g_entropy, g_sum_p2,
            ctx.temperature, ctx.ignore_index)
    if not ctx.inplace_backward:
        return logprobs_backward_op(*args), None, None, None, None, None, None
    logprobs_backward_inplace_op(*args)
    # The logits now hold their gradient: tell autograd, so that anything that saved them
    # (a second backward through this op, say) raises instead of reading the gradient as
    # logits.
    increment_version(logits)
    return logits, None, None, None, None, None, None


logprobs_op.register_autograd(_logprobs_backward, setup_context=_setup_logprobs)


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


def check_logprob_options(options: Mapping[str, Any], like: torch.Tensor) -> Checked:
    """`LOGPROB_OPTIONS` checked, check_labels' default resolved for `like`
    (`host_checks_by_default`: the range check needs a device sync on a GPU)."""
    opt = LOGPROB_OPTIONS.check(options)
    if opt.check_labels is None:
        opt.check_labels = host_checks_by_default(like)
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
    logp, entropy, sum_p2, _ = logprobs_op(
        logits, labels, opt.temperature, opt.ignore_index, return_entropy, return_sum_p2,
        inplace_backward)
    asked = (True, return_entropy, return_sum_p2)
    return single_or_tuple(tuple(out for out, was in zip((logp, entropy, sum_p2), asked) if was))
