"""Every public op reads every tensor argument in any memory layout as its values.

For each op and each of its tensor arguments, the argument is passed as a view in one
layout (the others contiguous) and the op runs through the Triton kernels; outputs and
gradients must equal (within 1e-12, float64) those of the same op on a contiguous copy of
that view, made inside the graph so that autograd maps the gradient back through the view
as it does for the view itself. Layouts:

* contiguous: a plain clone (the baseline);
* strided: every other element of a tensor twice the size in each dim, ``x[::2, ::2]``;
* sliced: the interior of a tensor one larger on each side in each dim, ``x[1:-1, 1:-1]``
  (a storage offset, and rows strided past the row length; the last dim stays stride 1);
* expanded: ``x[:1].expand(shape)`` (stride 0 in dim 0);
* transposed: ``x.mT`` of a contiguous tensor (2-D and up);
* permuted: ``x.transpose(0, 1)`` of a contiguous tensor (3-D and up);
* column: every other element of the last dim of a tensor twice as long in it,
  ``x[..., 1::2]`` (2-D and up; for a 1-D argument "strided" is this layout);
* broadcast: one element expanded to the whole shape, every stride 0 (2-D and up, or with
  a dim of size 1, which then has stride 0; for other 1-D arguments "expanded" is this).

The last two, and "strided" and "expanded" of a 1-D argument, stay views when flattened
(``reshape(-1)``, ``view(-1)``: a view of stride 2 and offset 1, or of stride 0), so an op
that flattens an argument and hands it to a kernel reading element ``i`` at ``ptr + i``
gives wrong numbers on them; the other layouts of an N-D argument make reshape copy.

The elements of the strided and sliced bases outside the view are poison (NaN, an
out-of-range int, True), so an op reading past its view gives a wrong number, and every
base must be unchanged afterwards: nothing writes outside the view (nor into an input).
A layout an op documents as rejected (a last dim of stride != 1 for the logits of
`logprobs`) must raise a ValueError naming the argument.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from triton.runtime.interpreter import GridExecutor

import rlhf_fast
import rlhf_fast.losses
from helpers import random_gae_case, rel_err
from rlhf_fast import reference
from rlhf_fast.kernels.common import fp32

F64 = torch.float64
NAN = float("nan")
POISON_INT = -7  # neither a valid token id nor ignore_index, and a negative length
V, D = 7, 5  # vocabulary and hidden size of the linear ops


# ----------------------------------------------------------------- layouts


def _poison(like: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if like.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    if like.is_floating_point():
        return torch.full(shape, NAN, dtype=like.dtype)
    return torch.full(shape, POISON_INT, dtype=like.dtype)


def make_base(t: torch.Tensor, layout: str) -> tuple[torch.Tensor, Callable]:
    """(base, view): view(base) is `t` (or, for "expanded", `t`'s first slice broadcast
    over dim 0) in `layout`."""
    n = t.dim()
    if layout == "contiguous":
        return t.clone(), lambda b: b
    if layout in ("strided", "sliced"):
        if layout == "strided":
            shape, index = [2 * s for s in t.shape], (slice(None, None, 2),) * n
        else:
            shape, index = [s + 2 for s in t.shape], (slice(1, -1),) * n
        base = _poison(t, shape)
        base[index] = t
        return base, lambda b: b[index]
    if layout == "expanded":
        return t[:1].clone(), lambda b: b.expand(t.shape)
    if layout == "transposed":
        return t.mT.contiguous(), lambda b: b.mT
    if layout == "permuted":
        return t.transpose(0, 1).contiguous(), lambda b: b.transpose(0, 1)
    if layout == "column":
        index = (..., slice(1, None, 2))
        base = _poison(t, [*t.shape[:-1], 2 * t.shape[-1]])
        base[index] = t
        return base, lambda b: b[index]
    if layout == "broadcast":  # a 0-d base: expand() gives every dim stride 0
        return t.reshape(-1)[0].clone(), lambda b: b.expand(t.shape)
    raise AssertionError(layout)


def layouts_for(shape: torch.Size) -> list[str]:
    out = ["contiguous", "strided", "sliced", "expanded"]
    if len(shape) >= 2:
        out.append("transposed")
    if len(shape) >= 3:
        out.append("permuted")
    if len(shape) >= 2:
        out.append("column")
    if len(shape) >= 2 or 1 in shape:
        out.append("broadcast")
    return out


FLAT_VIEW_LAYOUTS = ("column", "broadcast")  # and a 1-D argument's "strided", "expanded"


def test_flattening_keeps_these_layouts_as_strided_views():
    """What those layouts are for: reshape(-1) of them is a view of their base whose
    stride is not 1 (an op must copy it before a kernel reads element i at ptr + i)."""
    for shape in ((6,), (1,), (2, 3), (2, 3, 4)):
        t = torch.arange(math.prod(shape), dtype=F64).reshape(shape)
        one_d = len(shape) == 1 and shape[0] > 1
        layouts = [*FLAT_VIEW_LAYOUTS, *(("strided", "expanded") if one_d else ())]
        for layout in set(layouts) & set(layouts_for(torch.Size(shape))):
            base, view = make_base(t, layout)
            flat = view(base).reshape(-1)
            assert flat.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
            assert flat.stride(0) != 1, (shape, layout)


# ----------------------------------------------------------------- the ops


def _floats(*shape: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=gen) * scale


def _mask(*shape: int, gen: torch.Generator, full_row: bool = False) -> torch.Tensor:
    """Random, with a valid entry in the first row (what "expanded" keeps), or the whole
    first row valid (a mean along dim 0 has an entry in every column)."""
    mask = torch.rand(*shape, generator=gen) < 0.7
    mask[0] |= full_row
    mask.view(-1)[0] = True
    return mask


def _labels(*shape: int, gen: torch.Generator, ignored: bool = True) -> torch.Tensor:
    labels = torch.randint(0, V, shape, generator=gen)
    if ignored:
        labels.view(-1)[1] = -100
    return labels


@dataclass
class Op:
    """One public op: `make` gives its tensor arguments (contiguous, float64 where it
    takes floats), `call` runs it on them, `outputs` lists the tensors it returns."""

    call: Callable[..., Any]
    make: Callable[[torch.Generator], dict[str, torch.Tensor]]
    grads: tuple[str, ...] = ()  # the differentiable arguments
    outputs: Callable[[Any], list[torch.Tensor]] = lambda out: list(out)
    nonleaf: tuple[str, ...] = ()  # passed as an op's output (inplace_backward needs one)
    rejects: Callable[[str, torch.Tensor], str | None] = lambda name, view: None
    one_dtype: tuple[str, ...] = ()  # arguments that must share a dtype (a GEMM's operands)


def _one(out: torch.Tensor) -> list[torch.Tensor]:
    return [out]


def _logits_last_dim(name: str, view: torch.Tensor) -> str | None:
    if name == "logits" and view.shape[-1] > 1 and view.stride(-1) != 1:
        return "logits must have stride 1 in its last dim"
    return None


def _inplace_rejects(name: str, view: torch.Tensor) -> str | None:
    last_dim = _logits_last_dim(name, view)  # checked first
    if last_dim is None and name == "logits" and view.stride(0) == 0:
        return "inplace_backward=True needs logits whose elements do not share memory"
    return last_dim


def _ppo_make(gen: torch.Generator) -> dict[str, torch.Tensor]:
    logp = -torch.rand(2, 4, dtype=F64, generator=gen) * 3
    return dict(
        logp=logp, old_logp=logp + _floats(2, 4, gen=gen, scale=0.3),
        advantages=_floats(2, 4, gen=gen), mask=_mask(2, 4, gen=gen),
        ref_logp=logp + _floats(2, 4, gen=gen, scale=0.3),
        entropy=torch.rand(2, 4, dtype=F64, generator=gen) * 2,
        values=_floats(2, 4, gen=gen), old_values=_floats(2, 4, gen=gen),
        returns=_floats(2, 4, gen=gen),
    )


PPO_OPTIONS = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.1,
                   entropy_coef=0.01, value_clip=0.2, agg="seq-mean-token-mean")

# The options of the ops behind the nn.Module wrappers (which are built with them)
OPTIONS: dict[str, dict[str, Any]] = dict(
    ppo_loss=PPO_OPTIONS,
    dpo_loss=dict(loss_type="sigmoid_norm", reduction="none", beta=0.5),
    simpo_loss=dict(beta=2.0, gamma=1.0, reduction="none"),
    cpo_loss=dict(loss_type="ipo", alpha=0.5, reduction="none"),
    orpo_loss=dict(beta=0.5, reduction="none"),
    kto_loss=dict(beta=0.5, desirable_weight=1.33, reduction="none"),
    token_divergence=dict(temperature=0.8, beta=0.3),
    topk_token_divergence=dict(temperature=0.8, beta=0.3),
    linear_token_divergence=dict(beta=0.3),
)


def _ppo(logp, old_logp, advantages, mask, **kw):
    return rlhf_fast.ppo_loss(logp, old_logp, advantages, mask, **kw, **OPTIONS["ppo_loss"])


def _linear_make(gen: torch.Generator, *leading: int, **label_kw) -> dict[str, torch.Tensor]:
    return dict(hidden=_floats(*leading, D, gen=gen), weight=_floats(V, D, gen=gen),
                bias=_floats(V, gen=gen), labels=_labels(*leading, gen=gen, **label_kw))


def _linear_ppo_make(gen: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = _linear_make(gen, 2, 3, ignored=False)
    ppo = _ppo_make(gen)
    tensors.update({k: ppo[k][:, :3].contiguous() for k in (
        "old_logp", "advantages", "mask", "ref_logp", "values", "old_values", "returns")})
    return tensors


def _linear_ppo(hidden, weight, labels, old_logp, advantages, mask, bias, **kw):
    return rlhf_fast.linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask,
                                     bias=bias, **kw, **PPO_OPTIONS)


def _linear_dpo_make(gen: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = _linear_make(gen, 4, 3, ignored=False)
    tensors.update(mask=_mask(4, 3, gen=gen), ref_chosen=_floats(2, gen=gen),
                   ref_rejected=_floats(2, gen=gen))
    return tensors


def _linear_dpo(hidden, weight, labels, mask, ref_chosen, ref_rejected, bias):
    return rlhf_fast.linear_dpo_loss(hidden, weight, labels, mask, ref_chosen, ref_rejected,
                                     bias=bias, loss_type="sigmoid_norm", reduction="none")


def _dpo_make(gen: torch.Generator) -> dict[str, torch.Tensor]:
    names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    tensors = {k: _floats(3, gen=gen, scale=5.0) - 20 for k in names}
    for k in ("chosen_lengths", "rejected_lengths"):
        tensors[k] = torch.randint(1, 6, (3,), generator=gen)
    return tensors


def _dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **lengths):
    return rlhf_fast.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                              **OPTIONS["dpo_loss"], **lengths)


def _pair_make(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Sequence log-probs of 3 pairs and their answer lengths (a 0 among them)."""
    tensors = {k: _floats(3, gen=gen, scale=5.0) - 20 for k in ("policy_chosen",
                                                               "policy_rejected")}
    for k in ("chosen_lengths", "rejected_lengths"):
        tensors[k] = torch.randint(0, 6, (3,), generator=gen)
    return tensors


PAIR_GRADS = ("policy_chosen", "policy_rejected")

LM_HEAD = ("hidden", "weight", "bias")


def _divergence_rejects(name: str, view: torch.Tensor, inplace: bool = False) -> str | None:
    if name.endswith("_logits") and view.shape[-1] > 1 and view.stride(-1) != 1:
        return f"{name} must have stride 1 in its last dim"
    if inplace and name == "student_logits" and view.stride(0) == 0:
        return "inplace_backward=True needs student_logits whose elements do not share memory"
    return None


def _divergence_make(gen: torch.Generator, **rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(student_logits=_floats(2, 3, V, gen=gen, scale=2.0),
                teacher_logits=_floats(2, 3, V, gen=gen, scale=2.0), **rows)

OPS: dict[str, Op] = {
    "logprobs": Op(
        lambda logits, labels: rlhf_fast.logprobs(logits, labels, temperature=0.7,
                                                  return_entropy=True),
        lambda gen: dict(logits=_floats(2, 3, V, gen=gen, scale=2.0),
                         labels=_labels(2, 3, gen=gen)),
        grads=("logits",), rejects=_logits_last_dim,
    ),
    "logprobs[inplace_backward]": Op(
        lambda logits, labels: rlhf_fast.logprobs(logits, labels, return_entropy=True,
                                                  inplace_backward=True),
        lambda gen: dict(logits=_floats(2, 3, V, gen=gen, scale=2.0),
                         labels=_labels(2, 3, gen=gen)),
        grads=("logits",), nonleaf=("logits",), rejects=_inplace_rejects,
    ),
    "token_divergence": Op(
        lambda student_logits, teacher_logits, labels: rlhf_fast.token_divergence(
            student_logits, teacher_logits, labels, **OPTIONS["token_divergence"]),
        lambda gen: _divergence_make(gen, labels=_labels(2, 3, gen=gen)),
        grads=("student_logits",), outputs=_one, rejects=_divergence_rejects,
    ),
    "token_divergence[mask, inplace_backward]": Op(
        lambda student_logits, teacher_logits, labels: rlhf_fast.token_divergence(
            student_logits, teacher_logits, labels, divergence="reverse_kl",
            inplace_backward=True),
        lambda gen: _divergence_make(gen, labels=_mask(2, 3, gen=gen)),
        grads=("student_logits",), outputs=_one, nonleaf=("student_logits",),
        rejects=lambda name, view: _divergence_rejects(name, view, inplace=True),
    ),
    "topk_token_divergence": Op(
        lambda student_logits, teacher_topk_logp, teacher_topk_ids, labels:
        rlhf_fast.topk_token_divergence(student_logits, teacher_topk_logp, teacher_topk_ids,
                                        labels, **OPTIONS["topk_token_divergence"]),
        lambda gen: dict(student_logits=_floats(2, 3, V, gen=gen, scale=2.0),
                         teacher_topk_logp=-torch.rand(2, 3, 3, dtype=F64, generator=gen) - 1,
                         teacher_topk_ids=torch.randint(0, V, (2, 3, 3), generator=gen),
                         labels=_labels(2, 3, gen=gen)),
        grads=("student_logits",), outputs=_one,
        rejects=lambda name, view: _divergence_rejects(name, view),
    ),
    "linear_token_divergence": Op(
        lambda student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        student_bias, teacher_bias: rlhf_fast.linear_token_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias,
            **OPTIONS["linear_token_divergence"]),
        lambda gen: dict(
            student_hidden=_floats(2, 3, D, gen=gen), student_weight=_floats(V, D, gen=gen),
            teacher_hidden=_floats(2, 3, D + 1, gen=gen),
            teacher_weight=_floats(V, D + 1, gen=gen), labels=_labels(2, 3, gen=gen),
            student_bias=_floats(V, gen=gen), teacher_bias=_floats(V, gen=gen)),
        grads=("student_hidden", "student_weight", "student_bias"), outputs=_one,
        one_dtype=("student_hidden", "student_weight", "student_bias", "teacher_hidden",
                   "teacher_weight", "teacher_bias"),
    ),
    "linear_logprobs": Op(
        lambda hidden, weight, labels, bias: rlhf_fast.linear_logprobs(
            hidden, weight, labels, bias=bias, temperature=0.9, return_entropy=True),
        lambda gen: _linear_make(gen, 2, 3),
        grads=("hidden", "weight", "bias"), one_dtype=LM_HEAD,
    ),
    "linear_ppo_loss": Op(
        _linear_ppo, _linear_ppo_make, grads=("hidden", "weight", "bias", "values"),
        one_dtype=LM_HEAD,
    ),
    "linear_ppo_loss[rollout]": Op(
        lambda hidden, weight, labels, old_logp, advantages, mask, bias, **kw: _linear_ppo(
            hidden, weight, labels, old_logp, advantages, mask, bias, **kw,
            rollout_is="sequence", rollout_rs="seq_mean_k3", rollout_rs_threshold=0.5),
        lambda gen: _linear_ppo_make(gen) | dict(rollout_logp=-torch.rand(2, 3, dtype=F64,
                                                                         generator=gen) * 3),
        grads=("hidden", "weight", "bias", "values"), one_dtype=LM_HEAD,
    ),
    "linear_dpo_loss": Op(
        _linear_dpo, _linear_dpo_make,
        grads=("hidden", "weight", "bias", "ref_chosen", "ref_rejected"), one_dtype=LM_HEAD,
    ),
    "ppo_loss": Op(_ppo, _ppo_make, grads=("logp", "entropy", "values")),
    "ppo_loss[rollout]": Op(
        lambda logp, old_logp, advantages, mask, **kw: rlhf_fast.ppo_loss(
            logp, old_logp, advantages, mask, **kw, **PPO_OPTIONS, rollout_is="token",
            rollout_rs="token_k2", rollout_rs_threshold=0.5),
        lambda gen: _ppo_make(gen) | dict(rollout_logp=-torch.rand(2, 4, dtype=F64,
                                                                   generator=gen) * 3),
        grads=("logp", "entropy", "values"),
    ),
    "dpo_loss": Op(
        _dpo, _dpo_make,
        grads=("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"),
    ),
    "dpo_loss[mix]": Op(
        lambda policy_chosen, policy_rejected, ref_chosen, ref_rejected, weights, sft_logps,
        **lengths: rlhf_fast.dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, weights=weights,
            sft_logps=sft_logps, loss_type=["sigmoid_norm", "bco_pair"], loss_weights=[0.7, 0.3],
            rpo_alpha=0.5, reduction="none", beta=0.5, **lengths),
        lambda gen: _dpo_make(gen) | dict(weights=torch.rand(3, dtype=F64, generator=gen) + 0.5,
                                          sft_logps=_floats(3, gen=gen, scale=5.0) - 20),
        grads=("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "sft_logps"),
    ),
    "pair_logps": Op(
        lambda token_logp, mask, log_sum_p2: rlhf_fast.pair_logps(
            token_logp, mask, log_sum_p2=log_sum_p2, ld_alpha=0.5),
        lambda gen: dict(token_logp=-torch.rand(4, 5, dtype=F64, generator=gen) * 3,
                         mask=_mask(4, 5, gen=gen),
                         log_sum_p2=-torch.rand(4, 5, dtype=F64, generator=gen)),
        grads=("token_logp",),
    ),
    "simpo_loss": Op(
        lambda policy_chosen, policy_rejected, chosen_lengths, rejected_lengths:
            rlhf_fast.simpo_loss(policy_chosen, policy_rejected, chosen_lengths,
                                 rejected_lengths, **OPTIONS["simpo_loss"]),
        _pair_make, grads=PAIR_GRADS,
    ),
    "cpo_loss": Op(
        lambda policy_chosen, policy_rejected, chosen_lengths, rejected_lengths:
            rlhf_fast.cpo_loss(policy_chosen, policy_rejected, chosen_lengths,
                               rejected_lengths, **OPTIONS["cpo_loss"]),
        _pair_make, grads=PAIR_GRADS,
    ),
    "orpo_loss": Op(
        lambda policy_chosen, policy_rejected, chosen_lengths, rejected_lengths:
            rlhf_fast.orpo_loss(policy_chosen, policy_rejected, chosen_lengths,
                                rejected_lengths, **OPTIONS["orpo_loss"]),
        lambda gen: {k: (-v.abs() if k.startswith("policy") else v)  # log-probs <= 0
                     for k, v in _pair_make(gen).items()},
        grads=PAIR_GRADS,
    ),
    "kto_loss": Op(
        lambda policy_logps, ref_logps, desirable, kl_ref: rlhf_fast.kto_loss(
            policy_logps, ref_logps, desirable, kl_ref, **OPTIONS["kto_loss"]),
        lambda gen: dict(policy_logps=_floats(4, gen=gen) - 5, ref_logps=_floats(4, gen=gen) - 5,
                         desirable=torch.rand(4, generator=gen) < 0.5,
                         kl_ref=torch.rand(1, dtype=F64, generator=gen)),
        grads=("policy_logps", "ref_logps"),
        # an expanded `desirable` leaves one group empty: its mean reward is NaN
        outputs=lambda out: [out.loss, out.rewards, *(t.nan_to_num() for t in out[2:])],
    ),
    "sequence_logps": Op(
        lambda token_logp, mask: rlhf_fast.sequence_logps(token_logp, mask, average=True),
        lambda gen: dict(token_logp=-torch.rand(2, 2, 4, dtype=F64, generator=gen) * 3,
                         mask=_mask(2, 2, 4, gen=gen)),
        grads=("token_logp",), outputs=_one,
    ),
    "gae": Op(
        lambda rewards, values, mask, last_value: rlhf_fast.gae(
            rewards, values, mask, gamma=0.9, lam=0.8, last_value=last_value),
        lambda gen: dict(rewards=_floats(2, 4, gen=gen), values=_floats(2, 4, gen=gen),
                         mask=_mask(2, 4, gen=gen), last_value=_floats(2, gen=gen)),
    ),
    "discounted_returns": Op(
        lambda rewards, mask, last_value: rlhf_fast.discounted_returns(
            rewards, mask, gamma=0.9, last_value=last_value),
        lambda gen: dict(rewards=_floats(2, 4, gen=gen), mask=_mask(2, 4, gen=gen),
                         last_value=_floats(2, gen=gen)),
        outputs=_one,
    ),
    "group_advantages": Op(
        lambda scores: rlhf_fast.group_advantages(scores, 3),
        lambda gen: dict(scores=_floats(6, gen=gen)),
        outputs=_one,
    ),
    "group_advantages[opo]": Op(
        lambda scores, lengths: rlhf_fast.group_advantages(scores, 3, estimator="opo",
                                                           lengths=lengths),
        lambda gen: dict(scores=_floats(6, gen=gen),
                         lengths=torch.randint(1, 9, (6,), generator=gen)),
        outputs=_one,
    ),
    "group_advantages[remax]": Op(
        lambda scores, baselines: rlhf_fast.group_advantages(scores, 3, estimator="remax",
                                                             baselines=baselines),
        lambda gen: dict(scores=_floats(6, gen=gen), baselines=_floats(6, gen=gen)),
        outputs=_one,
    ),
    "group_advantages[gdpo]": Op(
        lambda scores, weights: rlhf_fast.group_advantages(scores, 3, estimator="gdpo",
                                                           weights=weights),
        lambda gen: dict(scores=_floats(6, 2, gen=gen), weights=torch.rand(2, dtype=F64,
                                                                           generator=gen)),
        outputs=_one,
    ),
    "optimal_token_baseline": Op(
        lambda rewards, mask, old_logp, log_sum_p2, rollout_is_weights:
            rlhf_fast.optimal_token_baseline(rewards, mask, old_logp, log_sum_p2, 2,
                                             rollout_is_weights=rollout_is_weights),
        lambda gen: dict(rewards=_floats(4, 5, gen=gen), mask=_mask(4, 5, gen=gen),
                         old_logp=-torch.rand(4, 5, dtype=F64, generator=gen),
                         log_sum_p2=-torch.rand(4, 5, dtype=F64, generator=gen),
                         rollout_is_weights=torch.rand(4, 5, dtype=F64, generator=gen) + 0.5),
    ),
    "masked_mean": Op(
        lambda x, mask: rlhf_fast.masked_mean(x, mask),
        lambda gen: dict(x=_floats(3, 4, gen=gen), mask=_mask(3, 4, gen=gen)),
        grads=("x",), outputs=_one,
    ),
    "masked_mean[dim=0]": Op(
        lambda x, mask: rlhf_fast.masked_mean(x, mask, dim=0),
        lambda gen: dict(x=_floats(3, 4, gen=gen), mask=_mask(3, 4, gen=gen, full_row=True)),
        grads=("x",), outputs=_one,
    ),
    "masked_whiten": Op(
        lambda x, mask: rlhf_fast.masked_whiten(x, mask, shift_mean=False),
        lambda gen: dict(x=_floats(2, 2, 4, gen=gen), mask=_mask(2, 2, 4, gen=gen)),
        grads=("x",), outputs=_one,
    ),
}

# Each public op's PyTorch fallback, the reference function of its name (the linear PPO
# and DPO losses have none of their own: they fall back through linear_logprobs, ppo_loss,
# pair_logps and dpo_loss): patched to fail, so that the cases below are known to run the
# Triton kernels (TRITON_INTERPRET=1, set by the conftest).
PUBLIC_OPS = {name: getattr(rlhf_fast, name) for name in rlhf_fast.__all__
              if inspect.isfunction(getattr(rlhf_fast, name))}
REFERENCE_FUNCTIONS = tuple(name for name in PUBLIC_OPS if hasattr(reference, name))


@pytest.fixture
def triton_only(monkeypatch):
    for name in REFERENCE_FUNCTIONS:
        def fail(*args, _name=name, **kwargs):
            raise AssertionError(f"reference.{_name} ran: the Triton path was not taken")
        monkeypatch.setattr(reference, name, fail)


@pytest.mark.parametrize("op_name", OPS)
def test_triton_only_stops_every_op_on_its_fallback(op_name, monkeypatch, triton_only):
    """With the PyTorch path forced, `triton_only` makes every op fail: it patches the
    fallback each op takes (so the cases that pass under it ran the kernels)."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    op = OPS[op_name]
    with pytest.raises(AssertionError, match="the Triton path was not taken"):
        op.call(**op.make(torch.Generator().manual_seed(0)))


# The cases' names of arguments whose public name is longer
ARGUMENT_ALIASES = {"hidden_chosen_and_rejected": "hidden"}


def test_every_public_op_and_tensor_argument_is_covered():
    """Every tensor parameter of every public function (by its annotation) is a case."""
    gen = torch.Generator().manual_seed(0)
    covered: dict[str, set[str]] = {}
    for name, op in OPS.items():
        covered.setdefault(name.split("[")[0], set()).update(op.make(gen))
    assert set(covered) == set(PUBLIC_OPS)
    for name, fn in PUBLIC_OPS.items():
        tensors = {ARGUMENT_ALIASES.get(p, p) for p, v in inspect.signature(fn).parameters.items()
                   if "Tensor" in str(v.annotation)}
        assert tensors <= covered[name], f"{name}: {sorted(tensors - covered[name])} untested"


def _cases():
    gen = torch.Generator().manual_seed(0)
    for op_name, op in OPS.items():
        for arg, value in op.make(gen).items():
            for layout in layouts_for(value.shape):
                yield pytest.param(op_name, arg, layout, id=f"{op_name}-{arg}-{layout}")


# ----------------------------------------------------------------- running one case


@dataclass
class Run:
    outputs: list[torch.Tensor]
    grads: list[torch.Tensor]
    # name -> (tensor, its values before the op, the elements nobody may write or None
    # for all of them)
    written: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(
        default_factory=dict)


def run(op: Op, values: dict[str, torch.Tensor], arg: str, layout: str, *, copy: bool,
        seed: int) -> Run:
    """The op with `arg` in `layout` (as that view, or a contiguous copy of it made in the
    graph when `copy`), the others contiguous; gradients of a random linear function of
    its differentiable outputs w.r.t. the bases of its differentiable arguments."""
    inputs, bases, result = {}, {}, Run([], [])
    for name, value in values.items():
        base, view = make_base(value, layout) if name == arg else (value.clone(), lambda b: b)
        bases[name] = base.requires_grad_(name in op.grads)
        result.written[name] = (base, base.detach().clone(), None)
        source = base
        if name in op.nonleaf:  # the in-place backward overwrites it, inside the view only
            source = base * 1
            if name == arg and layout != "contiguous":
                outside = ~view_positions(base, value, layout)
                result.written[f"{name} (non-leaf)"] = (source, source.detach().clone(), outside)
        inputs[name] = view(source).contiguous() if copy else view(source)
    outputs = op.outputs(op.call(**inputs))
    gen = torch.Generator().manual_seed(seed)
    differentiable = [o for o in outputs if o.requires_grad]
    if op.grads:
        assert differentiable
        loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=gen)).sum()
                   for o in differentiable)
        result.grads = list(torch.autograd.grad(loss, [bases[n] for n in op.grads]))
    result.outputs = [o.detach() for o in outputs]
    return result


def view_positions(base: torch.Tensor, arg_value: torch.Tensor, layout: str) -> torch.Tensor:
    """Bool mask over `base`: the elements its `layout` view of `arg_value` covers."""
    index = torch.arange(base.numel()).view(base.shape)
    _, view = make_base(arg_value, layout)
    covered = torch.zeros(base.numel(), dtype=torch.bool)
    covered[view(index).reshape(-1)] = True
    return covered.view(base.shape)


def assert_same(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)}"
    assert got.dtype == expected.dtype, f"{name}: dtype {got.dtype}"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("op_name, arg, layout", list(_cases()))
def test_input_layout(op_name, arg, layout, fresh_seed, triton_only):
    op = OPS[op_name]
    values = op.make(torch.Generator().manual_seed(fresh_seed))
    _, view = make_base(values[arg], layout)
    expected_error = op.rejects(arg, view(make_base(values[arg], layout)[0]))
    if expected_error is not None:
        with pytest.raises(ValueError, match=expected_error):
            run(op, values, arg, layout, copy=False, seed=fresh_seed)
        return

    got = run(op, values, arg, layout, copy=False, seed=fresh_seed)
    expected = run(op, values, arg, layout, copy=True, seed=fresh_seed)
    assert len(got.outputs) == len(expected.outputs)
    for i, (a, b) in enumerate(zip(got.outputs, expected.outputs)):
        assert_same(f"output {i}", a, b)
    for name, a, b in zip(op.grads, got.grads, expected.grads):
        assert_same(f"d {name}", a, b)
    # Nothing was written into an input, nor outside the view
    for name, (tensor, before, where) in got.written.items():
        after = tensor.detach()
        if where is not None:
            after, before = after[where], before[where]
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, name=name: f"{name} was written: {m}")


# ----------------------------------------------------------------- the nn.Module wrappers


# Each nn.Module of rlhf_fast.losses: the op it wraps (its case in OPS, whose options it
# is built with)
MODULE_OPS = {"PPOLoss": "ppo_loss", "DPOLoss": "dpo_loss", "SimPOLoss": "simpo_loss",
              "CPOLoss": "cpo_loss", "ORPOLoss": "orpo_loss", "KTOLoss": "kto_loss",
              "TokenDivergence": "token_divergence",
              "LinearTokenDivergence": "linear_token_divergence",
              "TopKTokenDivergence": "topk_token_divergence"}
LOSS_MODULES = sorted(name for name, cls in vars(rlhf_fast.losses).items()
                      if isinstance(cls, type) and issubclass(cls, torch.nn.Module)
                      and cls.__module__ == rlhf_fast.losses.__name__)
# A layout an argument does not have: the nearest it has ("strided" and "expanded" of a
# 1-D argument are its "column" and "broadcast")
NEAREST_LAYOUT = {"transposed": "strided", "column": "strided", "broadcast": "expanded"}


def test_every_loss_module_is_covered():
    assert set(MODULE_OPS) == set(LOSS_MODULES)


@pytest.mark.parametrize("layout", ["strided", "sliced", "expanded", "transposed", "column",
                                    "broadcast"])
@pytest.mark.parametrize("module", LOSS_MODULES)
def test_loss_modules_with_every_argument_in_one_layout(module, layout, fresh_seed,
                                                        triton_only):
    """The wrappers pass their tensors to the ops as they get them: all in `layout` at
    once (an argument without it in the nearest it has, one whose op rejects it as
    "sliced"), built with the options of its op's case in OPS."""
    op_name = MODULE_OPS[module]
    op = OPS[op_name]
    criterion = getattr(rlhf_fast.losses, module)(**OPTIONS[op_name])
    values = op.make(torch.Generator().manual_seed(fresh_seed))
    results = []
    for copy in (False, True):
        bases, inputs = {}, {}
        for name, value in values.items():
            this = layout if layout in layouts_for(value.shape) else NEAREST_LAYOUT[layout]
            base, view = make_base(value, this)
            if op.rejects(name, view(base)) is not None:
                base, view = make_base(value, "sliced")
            bases[name] = base.requires_grad_(name in op.grads)
            inputs[name] = view(base).contiguous() if copy else view(base)
        out = op.outputs(criterion(**inputs))
        gen = torch.Generator().manual_seed(fresh_seed)
        loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=gen)).sum()
                   for o in out if o.requires_grad)
        results.append((out, torch.autograd.grad(loss, [bases[k] for k in op.grads])))
    (out, d), (out_ref, d_ref) = results
    for i, (a, b) in enumerate(zip(out, out_ref)):
        assert_same(f"output {i}", a.detach(), b.detach())
    for name, a, b in zip(op.grads, d, d_ref):
        assert_same(f"d {name}", a, b)
    assert math.isfinite(float(out[0].detach().sum()))


# ----------------------------------------------------------------- dtypes of one argument


def run_values(op: Op, values: dict[str, torch.Tensor], seed: int
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(outputs, gradients w.r.t. op.grads) of the op on `values` as they are."""
    inputs = {k: v.clone().requires_grad_(k in op.grads) for k, v in values.items()}
    outputs = op.outputs(op.call(**{k: v * 1 if k in op.nonleaf else v
                                    for k, v in inputs.items()}))
    grads: list[torch.Tensor] = []
    if op.grads:
        gen = torch.Generator().manual_seed(seed)
        loss = sum((o.double() * torch.randn(o.shape, dtype=F64, generator=gen)).sum()
                   for o in outputs if o.requires_grad)
        grads = list(torch.autograd.grad(loss, [inputs[k] for k in op.grads]))
    return [o.detach() for o in outputs], grads


MASKED_OPS = [name for name, op in OPS.items()
              if "mask" in op.make(torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("op_name", MASKED_OPS)
def test_bf16_mask_with_negative_zeros_is_read_as_its_values(op_name, fresh_seed, triton_only):
    """-0.0 == 0: a bf16 mask's -0.0 entries are masked out (Triton 3.9's interpreter
    compares bf16 on raw bits, which would count them as set; `kernels.common.nonzero`)."""
    op = OPS[op_name]
    values = op.make(torch.Generator().manual_seed(fresh_seed))
    as_bool = values["mask"].bool()
    negative_zeros = torch.where(as_bool, 1.0, -0.0).to(torch.bfloat16)
    assert negative_zeros.view(torch.int16).ne(0).all()  # no +0.0 left: all raw bits set
    expected = run_values(op, dict(values, mask=as_bool), fresh_seed)
    got = run_values(op, dict(values, mask=negative_zeros), fresh_seed)
    for i, (a, b) in enumerate(zip(got[0] + got[1], expected[0] + expected[1])):
        assert_same(f"output or gradient {i}", a, b)


def _float_args(op_name: str) -> list[str]:
    values = OPS[op_name].make(torch.Generator().manual_seed(0))
    return [k for k, v in values.items()
            if v.is_floating_point() and k not in OPS[op_name].one_dtype]


@pytest.mark.parametrize("op_name, arg", [
    pytest.param(op_name, arg, id=f"{op_name}-{arg}")
    for op_name in OPS for arg in _float_args(op_name)
])
def test_one_bf16_argument_among_fp64_ones(op_name, arg, fresh_seed, triton_only):
    """Mixed precisions: one argument in bf16 (its gradient then comes back in bf16, cast
    from an fp64 value where the kernel accumulates in fp64, which Triton's interpreter
    gets wrong unless rounded through fp32: `kernels.common.cast`) gives what the same op
    gives on that argument's bf16 values in fp64, within the working precision."""
    op = OPS[op_name]
    values = op.make(torch.Generator().manual_seed(fresh_seed))
    low = values[arg].to(torch.bfloat16)
    expected = run_values(op, dict(values, **{arg: low.double()}), fresh_seed)
    outputs, grads = run_values(op, dict(values, **{arg: low}), fresh_seed)
    for i, (a, b) in enumerate(zip(outputs, expected[0])):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5,
                                   equal_nan=True, msg=lambda m, i=i: f"output {i}: {m}")
    # Where the bf16 argument sets the op's math dtype (ppo_loss's logp), the math is
    # fp32: on these O(1) inputs an absolute 1e-6, however small a gradient is (the value
    # loss's near v = R, say: seed 1009246057 gave 7e-9 on entries of 2.5e-5).
    floor = 1e-6 if outputs[0].dtype == torch.float32 else 0.0
    for name, a, b in zip(op.grads, grads, expected[1]):
        assert a.dtype == (torch.bfloat16 if name == arg else F64), name
        # one bf16 rounding of a value the kernel may accumulate in fp32
        tol = 2**-7 if name == arg else 1e-5
        torch.testing.assert_close(a.double(), b, rtol=tol,
                                   atol=max(tol * b.abs().max().item(), floor),
                                   msg=lambda m, name=name: f"d {name}: {m}")


# ----------------------------------------------------------------- float settings


def test_float_settings_reach_the_kernels_as_fp32_values(monkeypatch, fresh_seed):
    """Compiled Triton types a Python float argument as fp32 (the interpreter keeps more,
    so no output here would show it): a setting such as 1 / 0.7 or a whiten eps of 1e-6
    would reach an fp64 kernel rounded to 24 bits. So every float a kernel is launched
    with must be an fp32 value (settings go as `kernels.common.split_fp64` pairs)."""
    launched: list[tuple[str, float]] = []
    original = GridExecutor.__call__  # each launch, in every Triton version tested

    def record(self, *args, **kwargs):
        launched.extend((self.fn.__name__, a) for a in args if isinstance(a, float))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GridExecutor, "__call__", record)
    gen = torch.Generator().manual_seed(fresh_seed)
    for op in OPS.values():
        run_values(op, op.make(gen), fresh_seed)
    assert len({name for name, _ in launched}) >= 8  # the settings of most kernels
    rounded = [(name, a) for name, a in launched if a == a and fp32(a) != a]
    assert not rounded, f"float arguments fp32 cannot hold: {rounded}"


def test_advantage_ops_backend_switch(monkeypatch):
    rewards, values, mask, last_value = random_gae_case(4, 30)
    x = torch.randn(4, 30)
    scores = torch.randn(8)

    def run_all():
        return (
            *rlhf_fast.gae(rewards, values, mask, gamma=0.9, last_value=last_value),
            rlhf_fast.discounted_returns(rewards, mask, 0.9, last_value),
            rlhf_fast.group_advantages(scores, 4),
            rlhf_fast.masked_mean(x, mask),
            rlhf_fast.masked_whiten(x, mask),
        )

    triton_out = run_all()
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    for a, b in zip(triton_out, run_all()):
        # fp32 rounding relative to the data's scale (~1): a mean near 0 of unit-scale
        # values errs by ~1e-7 absolutely, which can be 2e-5 of the mean itself
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
    # without the interpreter, CPU tensors take the reference path
    monkeypatch.delenv("RLHF_FAST_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for a, b in zip(triton_out, run_all()):
        assert rel_err(a, b) < 1e-5
