"""`rlhf_fast.ppo_loss`: the whole PPO objective in one forward and one backward pass."""

from __future__ import annotations

import math

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import ppo as kernel
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INT64_MAX,
    MASK_DTYPES,
    check_fp32,
    check_same_device,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.reference import AGG_MODES, KL_ESTIMATORS, PPOLossOutput


class PPOLossFunction(torch.autograd.Function):
    """Autograd wrapper: returns the [10] outputs of `PPOLossOutput` as one tensor."""

    @staticmethod
    def forward(ctx, logp, entropy, values, old_logp, advantages, mask, ref_logp, old_values,
                returns, cfg):
        outputs, counts, row_stats = kernel.ppo_forward(
            logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns, cfg
        )
        ctx.save_for_backward(
            counts, row_stats, logp, old_logp, advantages, mask, ref_logp, values, old_values,
            returns,
        )
        ctx.cfg = cfg
        ctx.entropy_dtype = None if entropy is None else entropy.dtype
        return outputs

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_outputs):
        counts, row_stats, logp, old_logp, adv, mask, ref, values, old_v, ret = ctx.saved_tensors
        needs_logp, needs_entropy, needs_values = ctx.needs_input_grad[:3]
        d_logp, d_ent, d_v = kernel.ppo_backward(
            grad_outputs.contiguous(), counts, row_stats,
            logp, old_logp, adv, mask, ref, values, old_v, ret, ctx.cfg,
            grad_entropy_dtype=ctx.entropy_dtype if needs_entropy else None,
            grad_values=needs_values,
        )
        return (d_logp if needs_logp else None), d_ent, d_v, *([None] * 7)


def _check_coef(name: str, value: object, *, low: float, low_inclusive: bool = True,
                high: float = math.inf, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    above = value >= low if low_inclusive else value > low
    finite = math.isfinite(value) or (allow_inf and value == math.inf)
    if not (finite and above and (value < high or high == math.inf)):
        bound = f"{'>=' if low_inclusive else '>'} {low}"
        if high < math.inf:
            bound += f" and < {high}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return check_fp32(name, value)


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


def check_ppo_options(
    *, clip_eps: float, clip_eps_high: float | None, dual_clip: float | None,
    kl_coef: float, kl_estimator: str, entropy_coef: float, value_clip: float,
    vf_coef: float, agg: str, max_len: int | None,
) -> dict[str, object]:
    """Validate the non-tensor `ppo_loss` arguments (also `PPOLoss`'s, at construction).
    Returns them as the reference takes them (clip_eps_high filled in)."""
    clip_eps = _check_coef("clip_eps", clip_eps, low=0.0, high=1.0)
    clip_high = clip_eps
    if clip_eps_high is not None:
        clip_high = _check_coef("clip_eps_high", clip_eps_high, low=0.0)
    if dual_clip is not None:
        dual_clip = _check_coef("dual_clip", dual_clip, low=1.0, low_inclusive=False)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    # int64, so that B * max_len (the kernels' fp32 divisor) stays below fp32's max.
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                                or not 1 <= max_len <= INT64_MAX):
        raise ValueError(f"max_len must be a positive int (int64) or None, got {max_len!r}")
    return dict(
        clip_eps=clip_eps, clip_eps_high=clip_high, dual_clip=dual_clip,
        kl_coef=_check_coef("kl_coef", kl_coef, low=0.0), kl_estimator=kl_estimator,
        entropy_coef=_check_coef("entropy_coef", entropy_coef, low=-math.inf),
        value_clip=_check_coef("value_clip", value_clip, low=0.0, allow_inf=True),
        vf_coef=_check_coef("vf_coef", vf_coef, low=0.0), agg=agg, max_len=max_len,
    )


def check_ppo_arguments(
    like_name: str, like: torch.Tensor, tensors: dict[str, torch.Tensor | None],
    **options: object,
) -> tuple[dict[str, torch.Tensor | None], dict[str, object], kernel.PPOKernelConfig]:
    """Validate the `ppo_loss` arguments against the ``[B, T]`` tensor `like` (named
    `like_name` in errors); `options` are the keywords of `check_ppo_options`. Returns the
    tensors (contiguous), the options as the reference takes them, and the kernels' config."""
    checked = {}
    for name in ("old_logp", "advantages", "mask", "ref_logp", "entropy"):
        dtypes = MASK_DTYPES if name == "mask" else FLOAT_DTYPES
        checked[name] = _check_bt(name, tensors[name], like, like_name, dtypes)
    value_args = {k: tensors[k] for k in ("values", "old_values", "returns")}
    if any(v is not None for v in value_args.values()) and \
            any(v is None for v in value_args.values()):
        missing = [k for k, v in value_args.items() if v is None]
        raise ValueError(f"values, old_values and returns go together; missing {missing}")
    for name, value in value_args.items():
        checked[name] = _check_bt(name, value, like, like_name)
    options = check_ppo_options(**options)
    if options["kl_coef"] > 0 and checked["ref_logp"] is None:
        raise ValueError("ref_logp is required when kl_coef > 0")
    max_len = options["max_len"]
    cfg = kernel.PPOKernelConfig(
        clip_low=options["clip_eps"], clip_high=options["clip_eps_high"],
        has_dual=options["dual_clip"] is not None, dual_clip=options["dual_clip"] or 0.0,
        kl_code=kernel.KL_CODES[options["kl_estimator"]], kl_coef=options["kl_coef"],
        entropy_coef=options["entropy_coef"], value_clip=options["value_clip"],
        vf_coef=options["vf_coef"], agg_code=kernel.AGG_CODES[options["agg"]],
        max_len=like.shape[1] if max_len is None else max_len,
    )
    return checked, options, cfg


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    value_clip: float = 0.2,
    vf_coef: float = 0.5,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> PPOLossOutput:
    """PPO clipped surrogate + KL to a reference + entropy bonus + clipped value loss, fused.

    Per valid token (ratio r = exp(logp - old_logp), advantage A):
    pg = max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_eps_high)), and for A < 0 with
    `dual_clip` c: min(pg, -A c). kl = k1 | k2 | k3 estimate of KL(pi || pi_ref).
    vl = max((v - R)^2, (old_v + clip(v - old_v, +-value_clip) - R)^2) / 2.
    loss = agg(pg) + kl_coef agg(kl) - entropy_coef agg(entropy) + vf_coef agg(vl).

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (fp32,
            bf16, fp16 or fp64); differentiable.
        old_logp, advantages: ``[B, T]``, constants (from the rollout and GAE).
        mask: ``[B, T]`` bool or numeric, nonzero = valid (a mask, not a weight: 0.5
            counts as 1); tokens where it is 0 are never read.
        clip_eps: lower clip range, in [0, 1). clip_eps_high: upper range (clip-higher,
            DAPO); default clip_eps. dual_clip: c > 1 bounding the loss of A < 0 tokens.
        ref_logp: ``[B, T]`` reference-policy log-probs, needed when kl_coef > 0.
        kl_coef: >= 0. kl_estimator: "k1", "k2" or "k3".
        entropy: ``[B, T]`` per-token entropy (differentiable), for the bonus.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        values, old_values, returns: ``[B, T]``, all three or none; values differentiable.
        value_clip: >= 0 (inf disables value clipping). vf_coef: >= 0.
        agg: "token-mean" (sum / valid tokens), "seq-mean-token-mean" (mean over non-empty
            rows of each row's mean), "seq-mean-token-sum" (mean over non-empty rows of
            each row's sum), "seq-mean-token-sum-norm" (sum / (B * max_len), Dr. GRPO).
        max_len: the constant of seq-mean-token-sum-norm, an int64; default T. The other
            modes do not read it (as TRL's max_completion_length: a trainer may pass its
            generation length whatever the mode).
        Every float setting reaches the kernels as two fp32 halves (exact to ~48 bits
        for fp64): one that is finite but outside fp32's normal range ([1.2e-38,
        3.4e38] in magnitude, or 0) raises.

    Returns:
        `PPOLossOutput` of fp32 scalars (fp64 for fp64 logp): loss, policy_loss,
        value_loss, kl, entropy (each aggregated with `agg`, differentiable), and the
        token-mean statistics clipfrac, approx_kl (mean of (logp - old_logp)^2 / 2),
        ratio_mean, ratio_max, value_clipfrac (detached). With no valid token every field
        is 0 and so are the gradients. Gradients come back in each input's dtype. A NaN
        at a valid token (old_values included) makes every field that reads it NaN, but
        clipfrac and value_clipfrac, which count strictly clipped tokens only; the
        gradient at that token is NaN too (d values at a NaN old_values included).
    """
    check_tensor("logp", logp, FLOAT_DTYPES)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    tensors, options, cfg = check_ppo_arguments(
        "logp", logp, dict(old_logp=old_logp, advantages=advantages, mask=mask,
                           ref_logp=ref_logp, entropy=entropy, values=values,
                           old_values=old_values, returns=returns),
        clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy_coef=entropy_coef, value_clip=value_clip,
        vf_coef=vf_coef, agg=agg, max_len=max_len,
    )
    old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns = (
        tensors[k] for k in ("old_logp", "advantages", "mask", "ref_logp", "entropy", "values",
                             "old_values", "returns")
    )
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy is required when entropy_coef != 0")
    if not use_triton(logp):
        return reference.ppo_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy,
            values=values, old_values=old_values, returns=returns, **options,
        )
    outputs = PPOLossFunction.apply(
        logp.contiguous(), entropy, values, old_logp, advantages, mask, ref_logp, old_values,
        returns, cfg,
    )
    return PPOLossOutput(*outputs[:5], *outputs[5:].detach())
