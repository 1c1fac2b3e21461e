"""Drop rlhf-fast into TRL: its trainers' fused LM head computes with `linear_logprobs`.

TRL (>= 1.15) scores completions without full logits: `add_fused_lm_head` patches the
model so that ``model(..., labels=labels, fused_lm_head=True)`` returns per-token
``log_probs`` (and ``entropy``), and DPOTrainer, GRPOTrainer, RLOOTrainer, KTOTrainer and
SFTTrainer all call it that way. Inside, one autograd function does the work on the
valid positions: ``trl.trainer.utils._ChunkedLogProbFunction(hidden [N, D], weight
[V, D], bias, targets [N], temperature, chunk_size, final_logit_softcapping,
logit_scale, outputs)``. `patch_trl` swaps that function for `rlhf_fast.linear_logprobs`
and leaves the rest of TRL as it is (PEFT, FSDP, MoE auxiliary loss, sequence
parallelism, its losses), so a trainer changes by one line:

    import rlhf_fast.integrations.trl as rlhf_trl
    rlhf_trl.patch_trl()          # before or after building the trainer
    trainer = trl.DPOTrainer(...)

Calls our kernel cannot serve as well as TRL go to TRL's own function unchanged:

* a final-logit softcap (Gemma 2) or a non-positive logit scale (a positive scale s
  folds into the temperature: z = s * logits / T = logits / (T / s));
* per-token outputs other than ``log_probs`` and ``entropy``: DPOTrainer, KTOTrainer and
  SFTTrainer ask their policy for ``mean_logits`` / ``is_top1`` (metrics), so there
  only the reference model's forward runs on rlhf-fast; GRPOTrainer and RLOOTrainer
  run both policy and reference on it;
* inputs wider than the compute dtype (fp32 master weights under bf16 autocast, say)
  where torch has no fp32-output GEMM for the device (CPU, or torch < 2.8): TRL returns
  their gradients unrounded, and `linear_logprobs` could only round the bf16 products
  (as eager autocast does). On CUDA with torch >= 2.8 they are served, and a model
  loaded in bf16 is served everywhere;
* outside autocast, a weight or bias whose dtype is not hidden's (TRL casts them to
  hidden's; `linear_logprobs`, like F.linear, refuses).

Each distinct reason to fall back is warned about once (`FallbackWarning`), and `stats()`
counts the calls served and fallen back (by reason); `reset_stats()` starts afresh.
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from typing import Any

import torch

from rlhf_fast.kernels.linear_logprobs import has_fp32_output_gemm
from rlhf_fast.ops.linear_logprobs import linear_logprobs

#: The per-token outputs `linear_logprobs` computes; TRL's function returns five slots.
SUPPORTED_OUTPUTS = frozenset({"log_probs", "entropy"})
#: TRL's function's forward arguments after ctx, in the order `add_fused_lm_head` passes.
TRL_ARGUMENTS = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                 "final_logit_softcapping", "logit_scale", "outputs")


def _trl_utils() -> Any:
    try:
        from trl.trainer import utils
    except ImportError as error:
        raise ImportError("patch_trl needs TRL: pip install 'trl>=1.15'") from error
    return utils


def _check_trl_function(function: Any) -> None:
    """Raise unless `function` takes the arguments this integration passes it."""
    forward = getattr(function, "forward", None)
    names = () if forward is None else tuple(inspect.signature(forward).parameters)[1:]
    if names != TRL_ARGUMENTS:
        import trl

        raise RuntimeError(
            f"patch_trl supports TRL versions whose trl.trainer.utils._ChunkedLogProbFunction "
            f"takes {TRL_ARGUMENTS} (TRL 1.15 to 1.16); TRL {trl.__version__} has "
            f"{names or function!r}"
        )


class FallbackWarning(UserWarning):
    """A call of TRL's fused LM head went to TRL's own function (warned once per reason)."""


#: calls served by rlhf-fast and, by reason, calls that went to TRL's function
_COUNTS: Counter[str] = Counter()
_WARNED: set[str] = set()
SERVED = "served"


def stats() -> dict[str, Any]:
    """Calls of TRL's fused LM head since the last `reset_stats`: {"served": n,
    "fallen_back": m, "fallback_reasons": {reason: count}}."""
    reasons = {k: v for k, v in _COUNTS.items() if k != SERVED}
    return {"served": _COUNTS[SERVED], "fallen_back": sum(reasons.values()),
            "fallback_reasons": reasons}


def reset_stats() -> None:
    """Zero the counts of `stats` and warn again about every fallback reason."""
    _COUNTS.clear()
    _WARNED.clear()


def _count_fallback(reason: str) -> None:
    _COUNTS[reason] += 1
    if reason not in _WARNED:  # once per reason: a training run makes thousands of calls
        _WARNED.add(reason)
        warnings.warn(f"rlhf-fast does not serve this call of TRL's fused LM head; TRL's own "
                      f"function computes it: {reason}", FallbackWarning, stacklevel=3)


def fallback_reason(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    final_logit_softcapping: float | None, logit_scale: float, outputs: tuple[str, ...],
) -> str | None:
    """Why `linear_logprobs` would not compute this call as TRL would (see above), or
    None when it would."""
    if final_logit_softcapping is not None:
        return "a final-logit softcap (final_logit_softcapping, Gemma 2)"
    if not logit_scale > 0:
        return "a non-positive logit_scale"
    extra = sorted(set(outputs) - SUPPORTED_OUTPUTS)
    if extra:
        return f"per-token outputs {extra} (rlhf-fast computes log_probs and entropy)"
    device = hidden.device.type
    dtypes = {t.dtype for t in (hidden, weight, bias) if t is not None}
    if not torch.is_autocast_enabled(device):
        return None if len(dtypes) == 1 else (
            f"outside autocast, mixed dtypes {sorted(map(str, dtypes))} (TRL casts the "
            "weight to hidden's; linear_logprobs, like F.linear, refuses)")
    compute = torch.get_autocast_dtype(device)
    if torch.float64 in dtypes:
        return "float64 inputs under autocast (autocast leaves them alone; TRL casts them)"
    if dtypes == {compute} or has_fp32_output_gemm(hidden.device, compute):
        return None
    return (f"inputs wider than autocast's {compute} on {device} (torch "
            f"{torch.__version__}), which has no fp32-output GEMM: load the model in "
            f"{compute} to be served")


def _served(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    final_logit_softcapping: float | None, logit_scale: float, outputs: tuple[str, ...],
) -> bool:
    """Whether `linear_logprobs` computes this call as TRL would (see above)."""
    return fallback_reason(hidden, weight, bias, final_logit_softcapping, logit_scale,
                           outputs) is None


class RlhfFastLogProbFunction:
    """Stands in for TRL's ``_ChunkedLogProbFunction``: the same ``apply`` signature and
    result, ``(log_probs [N], entropy [N] or None, None, None, None)`` in fp32, computed by
    `rlhf_fast.linear_logprobs`; calls it cannot serve go to `trl_function`."""

    trl_function: Any = None

    @classmethod
    def apply(
        cls, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        targets: torch.Tensor, temperature: float, chunk_size: int,
        final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
        outputs: tuple[str, ...] = ("log_probs",),
    ) -> tuple[torch.Tensor | None, ...]:
        reason = fallback_reason(hidden, weight, bias, final_logit_softcapping,
                                 logit_scale, outputs)
        if reason is not None:
            _count_fallback(reason)
            return cls.trl_function.apply(
                hidden, weight, bias, targets, temperature, chunk_size,
                final_logit_softcapping, logit_scale, outputs,
            )
        _COUNTS[SERVED] += 1
        result = linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature / logit_scale,
            return_entropy="entropy" in outputs,
        )
        log_probs, entropy = result if "entropy" in outputs else (result, None)
        return log_probs, entropy, None, None, None


def patch_trl() -> None:
    """Route TRL's fused LM head (every trainer that calls
    ``model(..., fused_lm_head=True)``) through `rlhf_fast.linear_logprobs`. Idempotent;
    `unpatch_trl` undoes it. Raises ImportError without TRL and RuntimeError for a TRL
    whose internals this integration does not know."""
    utils = _trl_utils()
    function = getattr(utils, "_ChunkedLogProbFunction", None)
    if function is RlhfFastLogProbFunction:
        return
    _check_trl_function(function)
    RlhfFastLogProbFunction.trl_function = function
    utils._ChunkedLogProbFunction = RlhfFastLogProbFunction


def unpatch_trl() -> None:
    """Give TRL its own fused LM head back (a no-op when it was not patched)."""
    utils = _trl_utils()
    if getattr(utils, "_ChunkedLogProbFunction", None) is RlhfFastLogProbFunction:
        utils._ChunkedLogProbFunction = RlhfFastLogProbFunction.trl_function
