"""The plumbing shared by `simpo_loss`, `cpo_loss` and `orpo_loss`, the losses on [B]
pairs without a reference: each one's custom ops (`register_pair_loss`) and its public
function's body (`pair_loss`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlhf_fast.kernels.common import math_dtype
from rlhf_fast.kernels.dpo_loss import REDUCTION_CODES
from rlhf_fast.ops.checks import (
    check_batch,
    check_like,
    check_token_counts,
    contiguous,
    differentiable_once,
    fake_grads,
    fake_loss_outputs,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import config_args, config_from_args, empty_like_absent, kernel_op


def register_pair_loss(name: str, kernel_config: type,
                       launch: tuple[Callable[..., Any], Callable[..., Any]], n_stats: int
                       ) -> Any:
    """The custom ops ``rlhf_fast::<name>`` and ``rlhf_fast::<name>_backward`` of a loss on
    [B] pairs, which run the loss's kernel module's (forward, backward) launchers `launch`
    (a `kernel_config` each; the forward writes `n_stats` statistics). Returns the forward
    op: (loss, chosen_rewards, rejected_rewards, stats) of (policy_chosen, policy_rejected,
    chosen_lengths, rejected_lengths, the config's `config_args`), the loss differentiable
    w.r.t. the policy's log-probs, the rewards and statistics not."""
    forward, backward = launch

    @kernel_op(name)
    def forward_op(
        policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
        chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, config: list[float],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return forward(*contiguous(policy_chosen, policy_rejected, chosen_lengths,
                                   rejected_lengths), config_from_args(kernel_config, config))

    @forward_op.register_fake
    def _(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths, config):
        reduction = config_from_args(kernel_config, config).reduction_code
        return fake_loss_outputs(policy_chosen, math_dtype(policy_chosen, policy_rejected),
                                 reduction == REDUCTION_CODES["none"], 2, n_stats)

    @kernel_op(f"{name}_backward")
    def backward_op(
        grad_loss: torch.Tensor, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
        chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, config: list[float],
        needs_grad: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients w.r.t. policy_chosen and policy_rejected where `needs_grad` asks
        for them (else empty)."""
        grads = backward(grad_loss.contiguous(), *contiguous(
            policy_chosen, policy_rejected, chosen_lengths, rejected_lengths),
            config_from_args(kernel_config, config), needs_grad=tuple(needs_grad))
        return tuple(empty_like_absent(policy_chosen) if g is None else g for g in grads)

    @backward_op.register_fake
    def _(grad_loss, policy_chosen, policy_rejected, chosen_lengths, rejected_lengths, config,
          needs_grad):
        return fake_grads((policy_chosen, policy_rejected), needs_grad, policy_chosen)

    def setup_context(ctx, inputs, output):
        *tensors, ctx.config = inputs
        ctx.save_for_backward(*tensors)
        ctx.mark_non_differentiable(*output[1:])

    def pair_loss_backward(ctx, grad_loss, _grad_chosen, _grad_rejected, _grad_stats):
        needs = list(ctx.needs_input_grad[:2])
        grads = backward_op(grad_loss, *ctx.saved_tensors, ctx.config, needs)
        return (*(g if needed else None for g, needed in zip(grads, needs)), None, None, None)

    pair_loss_backward.__qualname__ = name  # the name differentiable_once's error gives
    forward_op.register_autograd(differentiable_once(pair_loss_backward),
                                 setup_context=setup_context)
    return forward_op


def pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
              options: dict[str, Any], option_set: Any, reference_loss: Callable[..., Any],
              kernel_config: Any, op: Any, output: Callable[..., Any]) -> Any:
    """The body of simpo_loss, cpo_loss and orpo_loss: the same checks of the four [B]
    inputs and `options` (by `option_set`), then `reference_loss` off the GPU, else the
    loss's custom op `op` (`register_pair_loss`) with its `kernel_config`; `output` (the
    op's result type) of the loss, both rewards and each statistic the kernel wrote."""
    policy_chosen = check_batch("policy_chosen", policy_chosen)
    opt = option_set.check(options)
    policy_rejected = check_like("policy_rejected", policy_rejected, "policy_chosen",
                                 policy_chosen)
    chosen_lengths = check_token_counts("chosen_lengths", chosen_lengths, "policy_chosen",
                                        policy_chosen)
    rejected_lengths = check_token_counts("rejected_lengths", rejected_lengths,
                                          "policy_chosen", policy_chosen)
    if not use_triton(policy_chosen):
        return reference_loss(policy_chosen, policy_rejected, chosen_lengths,
                              rejected_lengths, **vars(opt))
    loss, chosen_rewards, rejected_rewards, stats = op(
        policy_chosen, policy_rejected, chosen_lengths, rejected_lengths,
        config_args(kernel_config.from_options(opt)))
    return output(loss, chosen_rewards, rejected_rewards, *stats.unbind())
