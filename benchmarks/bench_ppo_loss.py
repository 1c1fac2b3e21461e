"""Benchmark of `rlhf_fast.ppo_loss` against the same objective written in plain PyTorch.

The objective: clipped surrogate (clip_eps 0.2), k3 KL to a reference policy (kl_coef
0.05), entropy bonus (entropy_coef 0.01) and clipped value loss (value_clip 0.2, vf_coef
0.5), every term aggregated token-mean over the valid tokens. fp32 inputs ``[B, T]``,
right-padded bool mask (each row a prefix of valid tokens).

Providers (same inputs, same process):

* ``rlhf_fast``: ``rlhf_fast.ppo_loss(...).loss``.
* ``eager``: as TRL / verl write it: ``ratio = exp(logp - old_logp)``, ``torch.clamp``,
  ``torch.max`` of the two surrogate losses, ``masked_mean`` (sum(x * mask) / sum(mask))
  per term, ``clamp(values, old_values -+ clip)`` for the value loss.
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Variants: ``""`` (the objective above) and ``gspo+rollout_is`` (GSPO's sequence-level
ratio, aggregated seq-mean-token-mean, with verl's rollout correction: sequence-level
importance weights of pi_old / pi_rollout truncated at 2, the kernels' sequence pass and
their IS-weighted policy term; the other terms as above), where ``eager`` is
``rlhf_fast.reference.ppo_loss`` (verl's formulas in plain PyTorch; TRL has no GSPO with
a rollout correction).

No peer library takes per-token log-probs: Liger-Kernel's PPO-family losses start from
logits or hidden states, and are benchmarked against ours in the ``grpo`` and
``linear_ppo_loss`` suites.

Modes: ``fwd`` (no input requires grad: the loss and its statistics only), ``bwd``
(the backward alone; the forward building its graph runs untimed before each call) and
``fwd+bwd`` (``torch.autograd.grad`` of the loss w.r.t. logp, entropy and values).
Every provider is first checked against ``rlhf_fast.reference.ppo_loss`` in float64 on
the same inputs (loss, and in the backward modes the three gradients; rel. error <= 1e-5);
one that does not match is reported "wrong" and not timed.

Bytes-moved floor (GB/s column), with N = B * T: the inputs are 8 fp32 tensors (logp,
old_logp, advantages, ref_logp, entropy, values, old_values, returns) and a 1-byte bool
mask, i.e. 33 N bytes. ``fwd`` reads them once: 33 N. ``bwd`` reads them once and
writes three fp32 gradients (logp, entropy, values): 33 N + 12 N = 45 N. ``fwd+bwd``
does both: 78 N bytes. The gspo variant's forward reads rollout_logp too: 4 N more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import cases, gates
from rlhf_fast.benchmarks.cases import Case
from rlhf_fast.benchmarks.inputs import right_padded_mask

OP = "ppo_loss"
GPU_SHAPES = [(64, 512), (64, 4096), (512, 512), (512, 4096)]
QUICK_SHAPES = [(8, 64), (16, 200)]
DTYPE = torch.float32
MODES = ("fwd", "bwd", "fwd+bwd")
TOLERANCE = 1e-5

CLIP_EPS = 0.2
KL_COEF = 0.05
ENTROPY_COEF = 0.01
VALUE_CLIP = 0.2
VF_COEF = 0.5

#: The variants (module docstring) and the options each adds.
GSPO = "gspo+rollout_is"
VARIANTS = ("", GSPO)
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "": {},
    GSPO: dict(policy_loss="gspo", agg="seq-mean-token-mean", rollout_is="sequence",
               rollout_is_threshold=2.0),
}

#: Argument order of every provider function (then the variant).
TENSOR_NAMES = (
    "logp",
    "old_logp",
    "advantages",
    "mask",
    "ref_logp",
    "entropy",
    "values",
    "old_values",
    "returns",
    "rollout_logp",
)
#: Inputs that get gradients in the backward modes.
GRAD_NAMES = ("logp", "entropy", "values")


# --------------------------------------------------------------------------- providers


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's / verl's masked_mean: sum(x * mask) / sum(mask)."""
    return (x * mask).sum() / mask.sum()


def eager_ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor,
    entropy: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    rollout_logp: torch.Tensor,
    variant: str = "",
) -> torch.Tensor:
    """The PPO loss in plain torch ops, term by term as TRL / verl write it (the gspo
    variant: `rlhf_fast.reference.ppo_loss`, verl's formulas in plain PyTorch)."""
    if variant:
        return rlhf_fast_ppo_loss(logp, old_logp, advantages, mask, ref_logp, entropy, values,
                                  old_values, returns, rollout_logp, variant,
                                  impl=reference.ppo_loss)
    m = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - CLIP_EPS, 1.0 + CLIP_EPS)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), m)

    kl = ref_logp - logp  # k3 ("low_var_kl"): exp(ref - logp) - (ref - logp) - 1
    kl_loss = masked_mean(torch.exp(kl) - kl - 1, m)

    entropy_loss = masked_mean(entropy, m)

    vpred_clipped = torch.clamp(values, old_values - VALUE_CLIP, old_values + VALUE_CLIP)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), m)

    return pg_loss + KL_COEF * kl_loss - ENTROPY_COEF * entropy_loss + VF_COEF * vf_loss


def rlhf_fast_ppo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    ref_logp: torch.Tensor, entropy: torch.Tensor, values: torch.Tensor,
    old_values: torch.Tensor, returns: torch.Tensor, rollout_logp: torch.Tensor,
    variant: str = "", *, impl: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """``rlhf_fast.ppo_loss`` (or `impl`, e.g. the reference) with the benchmark's settings
    and the variant's."""
    options: dict[str, Any] = dict(VARIANT_OPTIONS[variant])
    if variant:
        options["rollout_logp"] = rollout_logp
    out = (impl or rlhf_fast.ppo_loss)(
        logp,
        old_logp,
        advantages,
        mask,
        clip_eps=CLIP_EPS,
        ref_logp=ref_logp,
        kl_coef=KL_COEF,
        kl_estimator="k3",
        entropy=entropy,
        entropy_coef=ENTROPY_COEF,
        values=values,
        old_values=old_values,
        returns=returns,
        value_clip=VALUE_CLIP,
        vf_coef=VF_COEF,
        **{"agg": "token-mean", **options},
    )
    return out.loss


PROVIDERS = {
    "rlhf_fast": rlhf_fast_ppo_loss,
    **cases.eager_and_compiled(eager_ppo_loss),
}


# --------------------------------------------------------------------------- inputs


def make_inputs(shape: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """Random fp32 inputs with ~20% clipped ratios, and a right-padded bool mask."""
    b, t = shape
    gen = torch.Generator(device=device).manual_seed(1234)

    def randn(scale: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=DTYPE) * scale

    logp = -torch.rand(shape, generator=gen, device=device, dtype=DTYPE) * 4.0
    values = randn()
    mask = right_padded_mask(b, t, gen)
    return {
        "logp": logp,
        "old_logp": logp + randn(0.2),
        "advantages": randn(),
        "mask": mask,
        "ref_logp": logp + randn(0.3),
        "entropy": torch.rand(shape, generator=gen, device=device, dtype=DTYPE) * 3.0,
        "values": values,
        "old_values": values + randn(0.2),
        "returns": randn(),
        "rollout_logp": logp + randn(0.05),
    }


def bytes_moved(shape: tuple[int, int], mode: str, variant: str = "") -> int:
    """fwd: 8 fp32 inputs + bool mask read once (33 N; gspo: rollout_logp too, 37 N);
    bwd: once + 3 grads written (45 N); fwd+bwd: both (78 N; gspo 82 N)."""
    n = shape[0] * shape[1]
    inputs = 8 * 4 * n + n
    forward = inputs + (4 * n if variant else 0)
    backward = inputs + 3 * 4 * n
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


# --------------------------------------------------------------------------- one case


def _args(inp: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [leaves.get(name, inp[name]) for name in TENSOR_NAMES]


def _gate(
    case: Case, inp: dict[str, torch.Tensor], fn: Callable[..., torch.Tensor]
) -> tuple[bool, dict[str, float]]:
    """Run the provider once; compare the loss (and grads) with the float64 reference."""
    backward = case.mode != "fwd"
    ref_inp = {k: (v if v.dtype == torch.bool else v.double()) for k, v in inp.items()}
    ref_leaves = {k: ref_inp[k].clone().requires_grad_(backward) for k in GRAD_NAMES}
    ref_loss = rlhf_fast_ppo_loss(*_args(ref_inp, ref_leaves), case.variant,
                                  impl=reference.ppo_loss)
    leaves = {k: inp[k].detach().clone().requires_grad_(backward) for k in GRAD_NAMES}
    loss = fn(*_args(inp, leaves), case.variant)
    errors: dict[str, float] = {}
    ok, errors["loss"] = gates.check_close(loss, ref_loss, TOLERANCE)
    if backward:
        grads = torch.autograd.grad(loss, [leaves[k] for k in GRAD_NAMES])
        ref_grads = torch.autograd.grad(ref_loss, [ref_leaves[k] for k in GRAD_NAMES])
        for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
            good, errors[f"grad_{name}"] = gates.check_close(g, r, TOLERANCE)
            ok &= good
    return ok, errors


def _timed(
    case: Case, inp: dict[str, torch.Tensor], fn: Callable[..., torch.Tensor]
) -> tuple[Callable[..., Any], Callable[[], Any] | None]:
    """The timed call and its untimed per-call setup (or None) for the case's mode."""
    variant = case.variant
    if case.mode == "fwd":
        args = _args(inp, {})
        return (lambda: fn(*args, variant)), None

    def forward() -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = {k: inp[k].detach().clone().requires_grad_(True) for k in GRAD_NAMES}
        return fn(*_args(inp, leaves), variant), [leaves[k] for k in GRAD_NAMES]

    if case.mode == "bwd":  # the forward building the graph runs untimed before each call
        return (lambda state: torch.autograd.grad(*state)), forward
    leaves = {k: inp[k].detach().clone().requires_grad_(True) for k in GRAD_NAMES}
    args, wrt = _args(inp, leaves), [leaves[k] for k in GRAD_NAMES]
    return (lambda: torch.autograd.grad(fn(*args, variant), wrt)), None


SUITE = cases.Suite(
    OP, cases.sizes(GPU_SHAPES, DTYPE), cases.sizes(QUICK_SHAPES, DTYPE), MODES, PROVIDERS,
    make_inputs=lambda case, device: make_inputs(case.shape, device),
    gate=_gate,
    timed=_timed,
    columns=cases.copy_bandwidth_columns(
        lambda case: bytes_moved(case.shape, case.mode, case.variant)),
    variants=VARIANTS,
)


def test_ppo_loss(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
