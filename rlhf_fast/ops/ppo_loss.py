"""`rlhf_fast.ppo_loss`: the whole PPO objective in one forward and one backward pass."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import ppo_loss as kernel
from rlhf_fast.kernels.ppo_terms import PPOKernelConfig
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    MASK_DTYPES,
    check_same_device,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import config_args, config_from_args, empty_like_absent, kernel_op
from rlhf_fast.options import PPO_OPTIONS
from rlhf_fast.types import PPOLossOutput


def _compute_dtype(logp: torch.Tensor) -> torch.dtype:
    return torch.float64 if logp.dtype == torch.float64 else torch.float32


@kernel_op("ppo_loss")
def ppo_loss_op(
    logp: torch.Tensor, entropy: torch.Tensor | None, values: torch.Tensor | None,
    old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    ref_logp: torch.Tensor | None, old_values: torch.Tensor | None,
    returns: torch.Tensor | None, is_weights: torch.Tensor | None,
    kl_cov_coef: torch.Tensor | None, cfg: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(outputs [N_OUTPUTS] in `PPOLossOutput`'s order, counts [3], row_stats [B, tiles,
    N_ROW_STATS]) of `kernel.ppo_forward` on contiguous [B, T] inputs (None: absent);
    `cfg` the `config_args` of a `PPOKernelConfig`. Only outputs is differentiable (w.r.t.
    logp, entropy and values)."""
    return kernel.ppo_forward(
        logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns,
        config_from_args(PPOKernelConfig, cfg), is_weights, kl_cov_coef)


@ppo_loss_op.register_fake
def _(logp, *args):
    batch, positions = logp.shape
    # block_size(T) is T's next power of two, capped at MAX_BLOCK_T: one tile covers a row
    # of up to MAX_BLOCK_T positions, tiles of MAX_BLOCK_T a longer one
    tiles = -(-positions // kernel.MAX_BLOCK_T)
    dtype = _compute_dtype(logp)
    return (logp.new_empty(kernel.N_OUTPUTS, dtype=dtype), logp.new_empty(3, dtype=dtype),
            logp.new_empty((batch, tiles, kernel.N_ROW_STATS), dtype=dtype))


@kernel_op("ppo_loss_backward")
def ppo_loss_backward_op(
    grad_outputs: torch.Tensor, counts: torch.Tensor, row_stats: torch.Tensor,
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    ref_logp: torch.Tensor | None, values: torch.Tensor | None,
    old_values: torch.Tensor | None, returns: torch.Tensor | None,
    is_weights: torch.Tensor | None, kl_cov_coef: torch.Tensor | None, cfg: list[float],
    entropy_dtype: torch.dtype | None, grad_values: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d logp, d entropy, d values) from the upstream gradient of the forward's outputs:
    d entropy in `entropy_dtype` (empty when None), d values when `grad_values` (else
    empty)."""
    d_logp, d_ent, d_v = kernel.ppo_backward(
        grad_outputs.contiguous(), counts, row_stats, logp, old_logp, advantages, mask,
        ref_logp, values, old_values, returns, config_from_args(PPOKernelConfig, cfg),
        grad_entropy_dtype=entropy_dtype, grad_values=grad_values, is_weights=is_weights,
        kl_cov_coef=kl_cov_coef)
    return (d_logp, empty_like_absent(logp) if d_ent is None else d_ent,
            empty_like_absent(logp) if d_v is None else d_v)


@ppo_loss_backward_op.register_fake
def _(grad_outputs, counts, row_stats, logp, old_logp, advantages, mask, ref_logp, values,
      old_values, returns, is_weights, kl_cov_coef, cfg, entropy_dtype, grad_values):
    d_ent = (empty_like_absent(logp) if entropy_dtype is None
             else logp.new_empty(logp.shape, dtype=entropy_dtype))
    return (torch.empty_like(logp), d_ent,
            torch.empty_like(values) if grad_values else empty_like_absent(logp))


def _setup_ppo_loss(ctx, inputs, output):
    (logp, entropy, values, old_logp, advantages, mask, ref_logp, old_values, returns,
     is_weights, kl_cov_coef, ctx.cfg) = inputs
    _, counts, row_stats = output
    ctx.save_for_backward(counts, row_stats, logp, old_logp, advantages, mask, ref_logp,
                          values, old_values, returns, is_weights, kl_cov_coef)
    ctx.entropy_dtype = None if entropy is None else entropy.dtype
    ctx.mark_non_differentiable(counts, row_stats)
    ctx.set_materialize_grads(False)  # no zeros made for those


@differentiable_once
def _ppo_loss_backward(ctx, grad_outputs, _grad_counts, _grad_row_stats):
    (counts, row_stats, logp, old_logp, adv, mask, ref, values, old_v, ret, is_weights,
     kl_cov_coef) = ctx.saved_tensors
    needs_logp, needs_entropy, needs_values = ctx.needs_input_grad[:3]
    if grad_outputs is None:
        return (None,) * 12
    d_logp, d_ent, d_v = ppo_loss_backward_op(
        grad_outputs, counts, row_stats, logp, old_logp, adv, mask, ref, values, old_v, ret,
        is_weights, kl_cov_coef, ctx.cfg, ctx.entropy_dtype if needs_entropy else None,
        needs_values)
    return ((d_logp if needs_logp else None), (d_ent if needs_entropy else None),
            (d_v if needs_values else None), *([None] * 9))


ppo_loss_op.register_autograd(_ppo_loss_backward, setup_context=_setup_ppo_loss)


def fused_ppo_loss(
    logp: torch.Tensor, entropy: torch.Tensor | None, values: torch.Tensor | None,
    old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    ref_logp: torch.Tensor | None, old_values: torch.Tensor | None,
    returns: torch.Tensor | None, is_weights: torch.Tensor | None,
    kl_cov_coef: torch.Tensor | None, cfg: PPOKernelConfig,
) -> torch.Tensor:
    """The [N_OUTPUTS] outputs of the fused kernels (`ppo_loss_op`), differentiable
    w.r.t. logp, entropy and values."""
    return ppo_loss_op(logp, entropy, values, old_logp, advantages, mask, ref_logp,
                       old_values, returns, is_weights, kl_cov_coef, config_args(cfg))[0]


def _check_bt(name: str, value: torch.Tensor | None, like: torch.Tensor, like_name: str,
              dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> torch.Tensor | None:
    if value is None:
        return None
    check_tensor(name, value, dtypes)
    check_same_device(name, value, like_name, like)
    if value.shape != like.shape:
        raise ValueError(
            f"{name} must have {like_name}'s shape {tuple(like.shape)}, got {tuple(value.shape)}"
        )
    return value.contiguous()


def check_ppo_arguments(
    like_name: str, like: torch.Tensor, tensors: dict[str, torch.Tensor | None],
    options: Mapping[str, object],
) -> tuple[dict[str, torch.Tensor | None], SimpleNamespace, PPOKernelConfig]:
    """Validate the `ppo_loss` arguments against the ``[B, T]`` tensor `like` (named
    `like_name` in errors); `options` are `PPO_OPTIONS`. Returns the tensors (contiguous),
    the checked options, and the kernels' config."""
    checked = {}
    for name in ("old_logp", "advantages", "mask", "ref_logp", "entropy", "rollout_logp"):
        dtypes = MASK_DTYPES if name == "mask" else FLOAT_DTYPES
        checked[name] = _check_bt(name, tensors[name], like, like_name, dtypes)
    value_args = {k: tensors[k] for k in ("values", "old_values", "returns")}
    if any(v is not None for v in value_args.values()) and \
            any(v is None for v in value_args.values()):
        missing = [k for k, v in value_args.items() if v is None]
        raise ValueError(f"values, old_values and returns go together; missing {missing}")
    for name, value in value_args.items():
        checked[name] = _check_bt(name, value, like, like_name)
    opt = PPO_OPTIONS.check(options)
    if opt.kl_coef > 0 and checked["ref_logp"] is None:
        raise ValueError("ref_logp is required when kl_coef > 0")
    bypass = opt.policy_loss == "bypass_mode"
    if bypass and checked["rollout_logp"] is not None:
        raise ValueError("rollout_logp must be None for policy_loss 'bypass_mode' (its "
                         "old_logp is the rollout's)")
    corrected = opt.rollout_is is not None or opt.rollout_rs is not None
    if corrected and not bypass and checked["rollout_logp"] is None:
        raise ValueError("rollout_logp is required when rollout_is or rollout_rs is set "
                         "(but for policy_loss 'bypass_mode')")
    cfg = PPOKernelConfig.from_options(opt)
    return checked, opt, cfg


@PPO_OPTIONS.keywords
def ppo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
    values: torch.Tensor | None = None, old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None, rollout_logp: torch.Tensor | None = None,
    **options: Any,
) -> PPOLossOutput:
    """PPO's objective, fused: a policy-gradient term + KL to a reference + entropy bonus +
    clipped value loss.

    Per valid token (ratio r = exp(logp - old_logp), advantage A), the policy term of
    `policy_loss` (verl's names; each formula in `rlhf_fast.reference.policy_terms`), by
    default vanilla: pg = max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_eps_high)), and for
    A < 0 with `dual_clip` c: min(pg, -A c). kl = `kl_estimator`'s estimate of
    KL(pi || pi_ref). vl = max((v - R)^2, (old_v + clip(v - old_v, +-value_clip) - R)^2) / 2.
    loss = agg(pg) + kl_coef agg(kl) - entropy_coef agg(entropy) + vf_coef agg(vl).

    Launches: forward 2 (tiles, then their reduction), backward 1; the sequence losses
    (gspo, gspo_token, geo_mean) add one pass for their row means.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (fp32,
            bf16, fp16 or fp64); differentiable.
        old_logp, advantages: ``[B, T]``, constants (from the rollout and GAE).
        mask: ``[B, T]`` bool or numeric, nonzero = valid (a mask, not a weight: 0.5
            counts as 1); tokens where it is 0 are never read.
        ref_logp: ``[B, T]`` reference-policy log-probs, needed when kl_coef > 0.
        entropy: ``[B, T]`` per-token entropy (differentiable), for the bonus.
        values, old_values, returns: ``[B, T]``, all three or none; values differentiable.
        rollout_logp: ``[B, T]`` the rollout engine's log-probs of the sampled tokens, for
            the rollout correction (rollout_is, rollout_rs: verl's, in
            `rlhf_fast.reference.rollout_correction`); given alone, its statistics only.
        Options: below. Every float option reaches the kernels as two fp32 halves (exact
        to ~48 bits for fp64): one that is finite but outside fp32's normal range ([1.2e-38,
        3.4e38] in magnitude, or 0) raises.

    Returns:
        `PPOLossOutput` of fp32 scalars (fp64 for fp64 logp): loss, policy_loss,
        value_loss, kl, entropy (each aggregated with `agg`, differentiable), and the
        token-mean statistics clipfrac, approx_kl (mean of (logp - old_logp)^2 / 2),
        ratio_mean, ratio_max, value_clipfrac, clipfrac_low, clipfrac_high, dual_clipfrac
        (detached; `PPOLossOutput` says what each counts). With no valid token every
        field is 0 and so are the gradients. Gradients come back in each input's dtype.
        A NaN at a valid token (old_values included) makes every field that reads it NaN,
        but the fractions, which count strictly clipped tokens only; the gradient at that
        token is NaN too (d values at a NaN old_values included; a sequence loss's whole
        row, through its mean).
    """
    check_tensor("logp", logp, FLOAT_DTYPES)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    tensors, opt, cfg = check_ppo_arguments(
        "logp", logp, dict(old_logp=old_logp, advantages=advantages, mask=mask,
                           ref_logp=ref_logp, entropy=entropy, values=values,
                           old_values=old_values, returns=returns, rollout_logp=rollout_logp),
        options,
    )
    old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns = (
        tensors[k] for k in ("old_logp", "advantages", "mask", "ref_logp", "entropy", "values",
                             "old_values", "returns")
    )
    if opt.entropy_coef != 0 and entropy is None:
        raise ValueError("entropy is required when entropy_coef != 0")
    if opt.top_entropy_quantile < 1 and entropy is None:
        raise ValueError("entropy is required when top_entropy_quantile < 1")
    if not use_triton(logp):
        return reference.ppo_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy,
            values=values, old_values=old_values, returns=returns,
            rollout_logp=tensors["rollout_logp"], **vars(opt),
        )
    logp = logp.contiguous()
    dtype = _compute_dtype(logp)
    mask, is_weights, rollout_statistics = policy_weights(
        mask, old_logp, advantages, tensors["rollout_logp"], opt, dtype, logp, entropy)
    outputs = fused_ppo_loss(
        logp, entropy, values, old_logp, advantages, mask, ref_logp, old_values, returns,
        is_weights, kl_cov_coefficients(logp, advantages, mask, opt, dtype), cfg,
    )
    return PPOLossOutput(*outputs[:5], *outputs[5:].detach(), *rollout_statistics)


def policy_weights(
    mask: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
    rollout_logp: torch.Tensor | None, opt: SimpleNamespace, dtype: torch.dtype,
    logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(the mask the kernels read, the constant weights of the policy term or None, the
    rollout statistics of `PPOLossOutput`, `reference.ROLLOUT_STATISTICS`) in the
    kernels' compute `dtype`: `reference.policy_weights` (the rollout correction, TRL's
    entropy and off-policy masks) on the [B, T] constants, when any is asked for. `logp`
    (detached inside) is read by bypass_mode and the off-policy mask only, `entropy` by
    top_entropy_quantile."""
    if not needs_policy_weights(opt, rollout_logp):
        return mask, None, torch.zeros(len(reference.ROLLOUT_STATISTICS), dtype=dtype,
                                       device=mask.device)
    def cast(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.detach().to(dtype)

    with torch.no_grad():
        weights, kept, statistics = reference.policy_weights(
            cast(old_logp if logp is None else logp), cast(old_logp), cast(advantages),
            cast(entropy), cast(rollout_logp), mask != 0, opt)
    statistics = torch.stack([statistics[name] for name in reference.ROLLOUT_STATISTICS])
    return kept, None if weights is None else weights.contiguous(), statistics.to(dtype)


def needs_policy_weights(opt: SimpleNamespace, rollout_logp: torch.Tensor | None) -> bool:
    return (opt.policy_loss in ("bypass_mode", "clip_cov") or rollout_logp is not None
            or opt.top_entropy_quantile < 1 or opt.off_policy_mask_threshold is not None)


def kl_cov_coefficients(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        opt: SimpleNamespace, dtype: torch.dtype) -> torch.Tensor | None:
    """kl_cov's per-token weight of |log r| (`reference.kl_cov_coefficients`), else None."""
    if opt.policy_loss != "kl_cov":
        return None
    with torch.no_grad():
        return reference.kl_cov_coefficients(
            logp.detach().to(dtype), advantages.to(dtype), mask != 0, opt).contiguous()
