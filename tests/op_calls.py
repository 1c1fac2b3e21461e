"""One small call of every public op, on any device and float dtype: what the custom-op,
compile and no-sync tests run. Each builder returns ``(run, leaves)``: ``run()`` calls the
op and returns the tensors to sum into a loss (its differentiable outputs, or its plain
outputs for the ops without a gradient), ``leaves`` the inputs that require grad."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast

Call = tuple[Callable[[], list[torch.Tensor]], tuple[torch.Tensor, ...]]
B, T, V, D, K = 4, 5, 11, 8, 3


class Inputs:
    """Random tensors on one device and float dtype; `leaf` ones require grad. On the
    meta device they have shapes only (the no-sync test)."""

    def __init__(self, device: str | torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.leaves: list[torch.Tensor] = []

    def float(self, *shape: int, leaf: bool = False, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(shape, dtype=self.dtype, device=self.device) * scale
        if leaf:
            x.requires_grad_()
            self.leaves.append(x)
        return x

    def logp(self, *shape: int, leaf: bool = False) -> torch.Tensor:
        """Log-probs: negative, of moderate size."""
        x = -torch.rand(shape, dtype=self.dtype, device=self.device) * 2 - 0.1
        if leaf:
            x.requires_grad_()
            self.leaves.append(x)
        return x

    def labels(self, *shape: int, high: int = V) -> torch.Tensor:
        return torch.randint(0, high, shape, device=self.device)

    def mask(self, *shape: int) -> torch.Tensor:
        mask = torch.rand(shape, device=self.device) < 0.8
        if self.device.type != "meta":
            mask[..., 0] = True  # every row has a valid token
        return mask

    def call(self, run: Callable[[], Any]) -> Call:
        return run, tuple(self.leaves)


def _logprobs(x: Inputs) -> Call:
    logits, labels = x.float(B, T, V, leaf=True), x.labels(B, T)
    return x.call(lambda: list(rlhf_fast.logprobs(logits, labels, return_entropy=True,
                                                  return_sum_p2=True, temperature=0.7)))


def _linear_logprobs(x: Inputs) -> Call:
    hidden, weight, labels = x.float(B * T, D, leaf=True), x.float(V, D, leaf=True), \
        x.labels(B * T)
    return x.call(lambda: list(rlhf_fast.linear_logprobs(hidden, weight, labels,
                                                         return_entropy=True)))


def _ppo_loss(x: Inputs) -> Call:
    logp, entropy, values = x.logp(B, T, leaf=True), x.float(B, T, leaf=True), \
        x.float(B, T, leaf=True)
    old, ref, adv, mask = x.logp(B, T), x.logp(B, T), x.float(B, T), x.mask(B, T)
    old_values, returns = x.float(B, T), x.float(B, T)
    return x.call(lambda: [rlhf_fast.ppo_loss(
        logp, old, adv, mask, ref_logp=ref, entropy=entropy, values=values,
        old_values=old_values, returns=returns, kl_coef=0.1, entropy_coef=0.01,
        dual_clip=3.0, agg="seq-mean-token-mean").loss])


def _ppo_loss_gspo(x: Inputs) -> Call:
    logp, old, adv, mask, rollout = x.logp(B, T, leaf=True), x.logp(B, T), x.float(B, T), \
        x.mask(B, T), x.logp(B, T)
    return x.call(lambda: [rlhf_fast.ppo_loss(
        logp, old, adv, mask, rollout_logp=rollout, policy_loss="gspo", rollout_is="token",
        rollout_is_threshold=2.0).loss])


def _ppo_loss_masks(policy_loss: str) -> Callable[[Inputs], Call]:
    """ppo_loss with the policy weights computed in torch before the fused op: kl_cov's
    top-k, clip_cov's random draw, TRL's top-entropy quantile mask."""
    def build(x: Inputs) -> Call:
        logp, entropy = x.logp(B, T, leaf=True), x.float(B, T).abs()
        old, adv, mask = x.logp(B, T), x.float(B, T), x.mask(B, T)
        return x.call(lambda: [rlhf_fast.ppo_loss(
            logp, old, adv, mask, entropy=entropy, policy_loss=policy_loss,
            top_entropy_quantile=0.5, clip_cov_lb=-10.0, clip_cov_ub=10.0).loss])

    return build


def _linear_ppo_loss(x: Inputs) -> Call:
    hidden, weight, labels = x.float(2, T, D, leaf=True), x.float(V, D, leaf=True), \
        x.labels(2, T)
    old, adv, mask = x.logp(2, T), x.float(2, T), x.mask(2, T)
    return x.call(lambda: [rlhf_fast.linear_ppo_loss(hidden, weight, labels, old, adv, mask,
                                                     ref_logp=old, kl_coef=0.05).loss])


def _gae(x: Inputs) -> Call:
    rewards, values, mask = x.float(B, T), x.float(B, T), x.mask(B, T)
    return x.call(lambda: list(rlhf_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95)))


def _discounted_returns(x: Inputs) -> Call:
    rewards, mask = x.float(B, T), x.mask(B, T)
    return x.call(lambda: [rlhf_fast.discounted_returns(rewards, mask, gamma=0.9)])


def _group_advantages(x: Inputs) -> Call:
    scores = x.float(B * 2)
    return x.call(lambda: [rlhf_fast.group_advantages(scores, group_size=4)])


def _optimal_token_baseline(x: Inputs) -> Call:
    rewards, mask, old, sum_p2 = x.float(B, T), x.mask(B, T), x.logp(B, T), x.logp(B, T)
    return x.call(lambda: list(rlhf_fast.optimal_token_baseline(rewards, mask, old, sum_p2,
                                                                group_size=2)))


def _masked_mean(x: Inputs) -> Call:
    values, mask = x.float(B, T, leaf=True), x.mask(B, T)
    return x.call(lambda: [rlhf_fast.masked_mean(values, mask, dim=1)])


def _masked_whiten(x: Inputs) -> Call:
    values, mask, upstream = x.float(B, T, leaf=True), x.mask(B, T), x.float(B, T)
    return x.call(lambda: [rlhf_fast.masked_whiten(values, mask) * upstream])


def _sequence_logps(x: Inputs) -> Call:
    logp, mask = x.logp(B, T, leaf=True), x.mask(B, T)
    return x.call(lambda: [rlhf_fast.sequence_logps(logp, mask, average=True)])


def _pair_logps(x: Inputs) -> Call:
    logp, mask, sum_p2 = x.logp(B, T, leaf=True), x.mask(B, T), x.logp(B, T)
    return x.call(lambda: list(rlhf_fast.pair_logps(logp, mask, log_sum_p2=sum_p2,
                                                    ld_alpha=0.5)[:2]))


def _dpo_loss(x: Inputs) -> Call:
    pc, pr, rc, rr = x.logp(B, leaf=True), x.logp(B, leaf=True), x.logp(B), x.logp(B)
    return x.call(lambda: [rlhf_fast.dpo_loss(pc, pr, rc, rr, beta=0.2,
                                              label_smoothing=0.1).loss])


def _linear_dpo_loss(x: Inputs) -> Call:
    hidden, weight, labels = x.float(4, T, D, leaf=True), x.float(V, D, leaf=True), \
        x.labels(4, T)
    mask, ref_chosen, ref_rejected = x.mask(4, T), x.logp(2), x.logp(2)
    return x.call(lambda: [rlhf_fast.linear_dpo_loss(hidden, weight, labels, mask,
                                                     ref_chosen, ref_rejected).loss])


def _token_divergence(x: Inputs) -> Call:
    student, teacher, labels = x.float(B, T, V, leaf=True), x.float(B, T, V), x.labels(B, T)
    return x.call(lambda: [rlhf_fast.token_divergence(student, teacher, labels,
                                                      divergence="jsd", beta=0.3)])


def _linear_token_divergence(x: Inputs) -> Call:
    hidden, weight = x.float(2, T, D, leaf=True), x.float(V, D, leaf=True)
    teacher_hidden, teacher_weight, labels = x.float(2, T, D), x.float(V, D), x.labels(2, T)
    return x.call(lambda: [rlhf_fast.linear_token_divergence(
        hidden, weight, teacher_hidden, teacher_weight, labels)])


def _topk_token_divergence(x: Inputs) -> Call:
    student, labels = x.float(B, T, V, leaf=True), x.labels(B, T)
    topk_logp = torch.log_softmax(x.float(B, T, K), dim=-1)
    ids = torch.stack([torch.randperm(V, device=x.device)[:K] for _ in range(B * T)]) \
        .view(B, T, K) if x.device.type != "meta" else x.labels(B, T, K)
    return x.call(lambda: [rlhf_fast.topk_token_divergence(student, topk_logp, ids, labels)])


def _pair_loss(name: str) -> Callable[[Inputs], Call]:
    def build(x: Inputs) -> Call:
        pc, pr = x.logp(B, leaf=True), x.logp(B, leaf=True)
        lengths = torch.randint(1, 9, (2, B), device=x.device).to(x.dtype)
        loss = getattr(rlhf_fast, name)
        return x.call(lambda: [loss(pc, pr, lengths[0], lengths[1]).loss])

    return build


def _kto_loss(x: Inputs) -> Call:
    policy, ref = x.logp(B, leaf=True), x.logp(B)
    desirable = torch.arange(B, device=x.device) % 2 == 0
    kl = x.float(1).abs()
    return x.call(lambda: [rlhf_fast.kto_loss(policy, ref, desirable, kl).loss])


#: public op -> builder; a second entry of an op covers another of its kernel paths
CALLS: dict[str, Callable[[Inputs], Call]] = {
    "logprobs": _logprobs, "linear_logprobs": _linear_logprobs, "ppo_loss": _ppo_loss,
    "ppo_loss[gspo+rollout_is]": _ppo_loss_gspo,
    "ppo_loss[kl_cov+top_entropy]": _ppo_loss_masks("kl_cov"),
    "ppo_loss[clip_cov+top_entropy]": _ppo_loss_masks("clip_cov"),
    "linear_ppo_loss": _linear_ppo_loss,
    "gae": _gae, "discounted_returns": _discounted_returns,
    "group_advantages": _group_advantages, "optimal_token_baseline": _optimal_token_baseline,
    "masked_mean": _masked_mean, "masked_whiten": _masked_whiten,
    "sequence_logps": _sequence_logps, "pair_logps": _pair_logps, "dpo_loss": _dpo_loss,
    "linear_dpo_loss": _linear_dpo_loss, "token_divergence": _token_divergence,
    "linear_token_divergence": _linear_token_divergence,
    "topk_token_divergence": _topk_token_divergence, "simpo_loss": _pair_loss("simpo_loss"),
    "cpo_loss": _pair_loss("cpo_loss"), "orpo_loss": _pair_loss("orpo_loss"),
    "kto_loss": _kto_loss,
}


def public_op_names() -> set[str]:
    """Every public function of rlhf_fast (the ops CALLS must cover)."""
    return {name for name in rlhf_fast.__all__
            if callable(getattr(rlhf_fast, name)) and not isinstance(getattr(rlhf_fast, name),
                                                                     type)}
