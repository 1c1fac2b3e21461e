"""The cases `traffic` counts: each builds its inputs (uncounted) and returns the pass to
count and its floor: what the op's math must move, with masked-out entries never read (the
ops' contract), each needed input read once per pass and each output written once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

N, V = 64, 8192  # token rows and vocabulary: O(N) terms are ~1% of N V
B, T = 16, 1024  # sequences and tokens of the [B, T] ops
P = 4096  # pairs of dpo_loss, scores of group_advantages
BF16, F32 = 2, 4
Setup = Callable[[], tuple[Callable[[], Any], int]]


def _logits() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V, generator=gen).to(torch.bfloat16).requires_grad_()
    return logits, torch.randint(0, V, (N,), generator=gen)


def logprobs_forward() -> tuple[Callable[[], Any], int]:
    """The bf16 logits once, the labels, logp and entropy."""
    import rlhf_fast

    logits, labels = _logits()
    return (lambda: rlhf_fast.logprobs(logits.detach(), labels, return_entropy=True,
                                       check_labels=False),
            BF16 * N * V + 8 * N + 2 * F32 * N)


def logprobs_backward() -> tuple[Callable[[], Any], int]:
    """The logits once, the gradient once, the labels and both upstream gradients."""
    import rlhf_fast

    logits, labels = _logits()
    logp, entropy = rlhf_fast.logprobs(logits, labels, return_entropy=True)
    upstream = (torch.ones(N), torch.ones(N))
    return (lambda: torch.autograd.grad((logp, entropy), logits, upstream, retain_graph=True),
            2 * BF16 * N * V + 8 * N + 2 * F32 * N)


def _ppo_inputs() -> tuple[dict[str, torch.Tensor], int]:
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.2
    return dict(logp=logp.requires_grad_(), old_logp=logp.detach() + 0.1,
                advantages=torch.randn(B, T, generator=gen), mask=mask,
                ref_logp=logp.detach() - 0.1,
                entropy=torch.rand(B, T, generator=gen).requires_grad_()), int(mask.sum())


def ppo_loss_forward_backward() -> tuple[Callable[[], Any], int]:
    """Forward: the mask, and logp, old_logp, advantages, ref_logp, entropy at the valid
    tokens; backward: the mask and the four its gradients need (not entropy, whose
    gradient is a constant per token), both gradients written whole."""
    import rlhf_fast

    x, valid = _ppo_inputs()

    def run() -> Any:
        out = rlhf_fast.ppo_loss(x["logp"], x["old_logp"], x["advantages"], x["mask"],
                                 ref_logp=x["ref_logp"], entropy=x["entropy"], kl_coef=0.1,
                                 entropy_coef=0.01)
        return torch.autograd.grad(out.loss, (x["logp"], x["entropy"]))

    forward = B * T + 5 * F32 * valid
    backward = B * T + 4 * F32 * valid + 2 * F32 * B * T
    return run, forward + backward


def ppo_loss_gspo_forward_backward() -> tuple[Callable[[], Any], int]:
    """gspo, a sequence loss: as the token losses' (KL, entropy), plus its first pass
    (`_ppo_sequence_kernel`: the mask, and logp, old_logp and advantages at the valid
    tokens, for each row's mean log-ratio)."""
    import rlhf_fast

    x, valid = _ppo_inputs()

    def run() -> Any:
        out = rlhf_fast.ppo_loss(x["logp"], x["old_logp"], x["advantages"], x["mask"],
                                 ref_logp=x["ref_logp"], entropy=x["entropy"], kl_coef=0.1,
                                 entropy_coef=0.01, policy_loss="gspo")
        return torch.autograd.grad(out.loss, (x["logp"], x["entropy"]))

    sequence = B * T + 3 * F32 * valid
    forward = B * T + 5 * F32 * valid
    backward = B * T + 4 * F32 * valid + 2 * F32 * B * T
    return run, sequence + forward + backward


def masked_mean_forward_backward() -> tuple[Callable[[], Any], int]:
    """Along the rows (dim=-1). Forward: the mask and the valid x once, the [B] means and
    valid counts (saved for the backward); backward: the mask, the [B] upstream gradient
    and counts, the gradient written whole (the per-block partials, O(B T / 4096), are
    the slack)."""
    import rlhf_fast

    x, valid = _ppo_inputs()
    advantages = x["advantages"].requires_grad_()

    def run() -> Any:
        means = rlhf_fast.masked_mean(advantages, x["mask"], dim=-1)
        return torch.autograd.grad(means.sum(), advantages)

    forward = B * T + F32 * valid + (F32 + 8) * B  # the means and int64 valid counts
    backward = B * T + F32 * B + 8 * B + F32 * B * T
    return run, forward + backward


def masked_whiten_backward() -> tuple[Callable[[], Any], int]:
    """Two passes by design (the per-block sums of g and g * xhat, then the gradient):
    each reads the mask, and x and the upstream gradient at the valid tokens; the
    gradient written whole."""
    import rlhf_fast

    x, valid = _ppo_inputs()
    advantages = x["advantages"].requires_grad_()
    whitened = rlhf_fast.masked_whiten(advantages, x["mask"])
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(1))
    return (lambda: torch.autograd.grad(whitened, advantages, upstream, retain_graph=True),
            2 * (B * T + 2 * F32 * valid) + F32 * B * T)


def masked_whiten_forward() -> tuple[Callable[[], Any], int]:
    """Two passes (the statistics, then the output): the mask and the valid x twice, the
    output written whole."""
    import rlhf_fast

    x, valid = _ppo_inputs()
    return (lambda: rlhf_fast.masked_whiten(x["advantages"], x["mask"]),
            2 * (B * T + F32 * valid) + F32 * B * T)


def gae_forward() -> tuple[Callable[[], Any], int]:
    """The mask, rewards and values at the valid tokens, advantages and returns whole."""
    import rlhf_fast

    x, valid = _ppo_inputs()
    return (lambda: rlhf_fast.gae(x["advantages"], x["old_logp"], x["mask"]),
            B * T + 2 * F32 * valid + 2 * F32 * B * T)


def sequence_logps_forward_backward() -> tuple[Callable[[], Any], int]:
    """Forward: the mask and the valid token log-probs, the [B] sums; backward: the
    mask and the [B] upstream gradient, the [B, T] gradient written whole."""
    import rlhf_fast

    x, valid = _ppo_inputs()

    def run() -> Any:
        sums = rlhf_fast.sequence_logps(x["logp"], x["mask"])
        return torch.autograd.grad(sums.sum(), x["logp"])

    return run, (B * T + F32 * valid + F32 * B) + (B * T + F32 * B + F32 * B * T)


def optimal_token_baseline_forward() -> tuple[Callable[[], Any], int]:
    """The mask, and rewards, old_logp and log_sum_p2 at the valid tokens; advantages and
    returns written whole (the kernel's re-read of its returns hits in cache)."""
    import rlhf_fast

    x, valid = _ppo_inputs()
    return (lambda: rlhf_fast.optimal_token_baseline(
        x["advantages"], x["mask"], x["old_logp"], x["ref_logp"], 4),
        B * T + 3 * F32 * valid + 2 * F32 * B * T)


def _token_divergence(divergence: str) -> tuple[Callable[[], Any], int]:
    import rlhf_fast

    student, labels = _logits()
    teacher = torch.randn(N, V, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def run() -> Any:
        out = rlhf_fast.token_divergence(student, teacher, labels, divergence=divergence)
        return torch.autograd.grad(out.sum(), student)

    stats = 5 * F32 * N  # written by the forward, read by the backward
    forward = 2 * BF16 * N * V + 8 * N + F32 * N + stats
    backward = 3 * BF16 * N * V + 8 * N + F32 * N + stats
    return run, forward + backward


def token_divergence_kl() -> tuple[Callable[[], Any], int]:
    """Forward: both logits once, the labels, the divergence and 5 row statistics;
    backward: both logits once, the labels, the statistics and the upstream gradient, the
    student's gradient written."""
    return _token_divergence("forward_kl")


def token_divergence_jsd() -> tuple[Callable[[], Any], int]:
    """As the KL's: the forward's second read of both rows (the mixture's log needs both
    normalisers first) re-reads, in the same program, the row it just read."""
    return _token_divergence("jsd")


def linear_token_divergence_kl() -> tuple[Callable[[], Any], int]:
    """The divergence kernels' share of the fused path (the GEMMs are cuBLAS's): as
    `token_divergence_kl` on each chunk pair, the student's chunk overwritten with its
    gradient in the backward."""
    import rlhf_fast

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, 64, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, 64, generator=gen) / 8).to(torch.bfloat16).requires_grad_()
    teacher_hidden = torch.randn(N, 48, generator=gen).to(torch.bfloat16)
    teacher_weight = (torch.randn(V, 48, generator=gen) / 8).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=gen)

    def run() -> Any:
        out = rlhf_fast.linear_token_divergence(hidden, weight, teacher_hidden, teacher_weight,
                                                labels, divergence="forward_kl")
        return torch.autograd.grad(out.sum(), (hidden, weight))

    stats = 5 * F32 * N
    return run, (2 * BF16 * N * V + 8 * N + F32 * N + stats) + (
        3 * BF16 * N * V + 8 * N + F32 * N + stats)


def dpo_loss_forward_backward() -> tuple[Callable[[], Any], int]:
    """Forward: the four [P] sequence log-probs, the [P] chosen and rejected rewards, the
    loss and the two statistics; backward: the four inputs and the 0-d upstream gradient,
    the two policy gradients written."""
    import rlhf_fast

    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(P, generator=gen) for _ in range(4))
    pc.requires_grad_(), pr.requires_grad_()

    def run() -> Any:
        out = rlhf_fast.dpo_loss(pc, pr, rc, rr, beta=0.1)
        return torch.autograd.grad(out.loss, (pc, pr))

    return run, (F32 * (4 * P + 2 * P + 1 + 2)) + (F32 * (4 * P + 1 + 2 * P))


def _pairwise(loss: str) -> tuple[Callable[[], Any], int]:
    import rlhf_fast

    gen = torch.Generator().manual_seed(0)
    pc, pr = (-torch.rand(P, generator=gen) * 50 for _ in range(2))
    pc.requires_grad_(), pr.requires_grad_()
    chosen_lengths, rejected_lengths = (torch.randint(1, 512, (P,), generator=gen)
                                        for _ in range(2))
    op = getattr(rlhf_fast, loss)

    def run() -> Any:
        out = op(pc, pr, chosen_lengths, rejected_lengths)
        return torch.autograd.grad(out.loss, (pc, pr))

    return run, (F32 * 2 * P + 8 * 2 * P + F32 * (2 * P + 1 + 2)) + (
        F32 * 2 * P + 8 * 2 * P + F32 + F32 * 2 * P)


def simpo_loss_forward_backward() -> tuple[Callable[[], Any], int]:
    """Forward: the two [P] log-probs and the two int64 lengths, the two rewards, the
    loss and two statistics; backward: the same inputs and the upstream gradient, both
    gradients written."""
    return _pairwise("simpo_loss")


def orpo_loss_forward_backward() -> tuple[Callable[[], Any], int]:
    """As simpo_loss's (its batch NLL, a scalar, rides in the statistics)."""
    return _pairwise("orpo_loss")


def cpo_loss_forward_backward() -> tuple[Callable[[], Any], int]:
    """The sigmoid term and alpha = 1 times the chosen answers' NLL (the defaults).
    Forward: the two [P] log-probs and the int64 chosen lengths (the NLL's token count;
    the sigmoid term on sums reads no length), the two rewards, the loss and three
    statistics (accuracy, margin, NLL); backward: the same inputs and the upstream
    gradient, both gradients written."""
    import rlhf_fast

    gen = torch.Generator().manual_seed(0)
    pc, pr = (-torch.rand(P, generator=gen) * 50 for _ in range(2))
    pc.requires_grad_(), pr.requires_grad_()
    chosen_lengths, rejected_lengths = (torch.randint(1, 512, (P,), generator=gen)
                                        for _ in range(2))

    def run() -> Any:
        out = rlhf_fast.cpo_loss(pc, pr, chosen_lengths, rejected_lengths)
        return torch.autograd.grad(out.loss, (pc, pr))

    return run, (F32 * 2 * P + 8 * P + F32 * (2 * P + 1 + 3)) + (
        F32 * 2 * P + 8 * P + F32 + F32 * 2 * P)


def kto_loss_forward_backward() -> tuple[Callable[[], Any], int]:
    """With a reference model and a reference-point KL, the policy's log-probs alone
    differentiated (the reference's are a constant). Forward: the [P] policy and
    reference log-probs, the bool desirable flags (a byte each) and the 0-d KL, the [P]
    rewards, the loss and four statistics (the two groups' mean rewards, their margin,
    the KL used); backward: the same inputs and the upstream gradient, the policy's
    gradient written."""
    import rlhf_fast

    gen = torch.Generator().manual_seed(0)
    policy = (-torch.rand(P, generator=gen) * 50).requires_grad_()
    ref = policy.detach() + torch.randn(P, generator=gen)
    desirable = torch.rand(P, generator=gen) < 0.5
    kl = torch.tensor(0.2)

    def run() -> Any:
        out = rlhf_fast.kto_loss(policy, ref, desirable, kl)
        return torch.autograd.grad(out.loss, policy)

    inputs = F32 * 2 * P + P + F32
    return run, (inputs + F32 * (P + 1 + 4)) + (inputs + F32 + F32 * P)


def group_advantages_forward() -> tuple[Callable[[], Any], int]:
    """The [P] scores (read twice by design: the second read, which writes, hits in
    cache) and the [P] advantages written."""
    import rlhf_fast

    scores = torch.randn(P, generator=torch.Generator().manual_seed(0))
    return lambda: rlhf_fast.group_advantages(scores, 8), 2 * F32 * P


def linear_logprobs_forward_backward() -> tuple[Callable[[], Any], int]:
    """The log-prob kernels' share of the fused lm_head path (the GEMMs are cuBLAS's):
    forward, each logits chunk the lm_head GEMM wrote read once, the labels, logp and the
    saved row statistics; backward, each recomputed chunk read once and overwritten with
    its gradient, the labels, the statistics and the upstream gradient."""
    import rlhf_fast

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, 64, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, 64, generator=gen) / 8).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)

    def run() -> Any:
        logp = rlhf_fast.linear_logprobs(hidden, weight, labels)
        return torch.autograd.grad(logp.sum(), (hidden, weight))

    forward = BF16 * N * V + 8 * N + F32 * N + 2 * F32 * N
    backward = 2 * BF16 * N * V + 8 * N + 2 * F32 * N + F32 * N
    return run, forward + backward


NL, DL = 64, 64  # linear_ppo_loss's tokens and hidden size


def _linear_ppo(share: str, VL: int) -> tuple[Callable[[], Any], int]:
    import rlhf_fast

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, NL // 4, DL, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(VL, DL, generator=gen) / 8).to(torch.bfloat16).requires_grad_()
    x = {k: v[:4, :NL // 4].contiguous() for k, v in _ppo_inputs()[0].items()}
    mask = x["mask"]
    labels = torch.randint(0, VL, (4, NL // 4), generator=gen)
    valid = int(mask.sum())

    def run() -> Any:
        out = rlhf_fast.linear_ppo_loss(hidden, weight, labels, x["old_logp"],
                                        x["advantages"], mask, ref_logp=x["ref_logp"],
                                        kl_coef=0.1, entropy_coef=0.01)
        return torch.autograd.grad(out.loss, (hidden, weight))

    # the token weights (the mask's role) whole, logp, old_logp, advantages and ref_logp
    # at the valid tokens; d logp and d entropy written whole
    token_grads = F32 * NL + 4 * F32 * valid + 2 * F32 * NL
    if share == "token_grads":
        return run, token_grads
    # the rows of valid tokens of the logits chunk once (masked tokens' labels are
    # ignored: their rows are not read), the labels, logp, entropy and 2 row statistics
    logprobs_fwd = BF16 * valid * VL + 8 * NL + 4 * F32 * NL
    # the valid rows read and the whole chunk overwritten with its gradient (zeros on the
    # masked rows, for the GEMMs that read it), the labels, and at the valid rows the
    # statistics, the entropy and both upstream gradients
    logprobs_bwd = BF16 * valid * VL + BF16 * NL * VL + 8 * NL + 5 * F32 * valid
    # the loss's statistics: ppo_loss's forward on the log-probs and entropy just made
    # (the mask, logp, old_logp, advantages, ref_logp and entropy at the valid tokens)
    statistics = NL + 5 * F32 * valid
    return run, logprobs_fwd + token_grads + logprobs_bwd + statistics


def linear_ppo_loss_forward_backward() -> tuple[Callable[[], Any], int]:
    """The kernels' share of the fused PPO loss on hidden states (the GEMMs are cuBLAS's),
    with a KL and an entropy bonus, some tokens masked: per chunk, the
    log-prob forward (the valid rows of the logits chunk the lm_head GEMM wrote, once),
    the token gradients, the log-prob backward (the valid rows read, the chunk
    overwritten with its gradient), then ppo_loss's forward for the statistics."""
    return _linear_ppo("all", 2048)


def linear_ppo_loss_token_grads() -> tuple[Callable[[], Any], int]:
    """`_ppo_token_grad_kernel` alone (next to the logits, any vocabulary's, it is too
    small to show in the whole path's ratio; a vocabulary of 64 keeps the run short): the
    token weights whole (0 marks a masked token), logp, old_logp, advantages and ref_logp
    at the valid tokens, d logp and d entropy written whole."""
    return _linear_ppo("token_grads", 64)


LINEAR_PPO_LAUNCHES = ("_logprobs_fwd_kernel", "_ppo_token_grad_kernel", "_logprobs_bwd_kernel",
                       "_ppo_fwd_kernel", "_ppo_reduce_kernel")


class Case(NamedTuple):
    setup: Setup  # the pass and its floor
    launches: tuple[str, ...]  # the kernels it launches, in order
    budget: float  # of moved / floor
    share: tuple[str, ...] | None = None  # the kernels whose bytes count (None: all)


#: name -> (the pass and its floor, the kernels it launches, the budget of moved / floor
#: [, the kernels counted])
CASES: dict[str, Case] = {name: Case(*spec) for name, spec in {
    "logprobs fwd (+ entropy), [64, 8192] bf16": (
        logprobs_forward, ("_logprobs_fwd_kernel",), 1.002),
    "logprobs bwd (both outputs), [64, 8192] bf16": (
        logprobs_backward, ("_logprobs_bwd_kernel",), 1.002),
    "token_divergence fwd+bwd (forward_kl), [64, 8192] bf16": (
        token_divergence_kl, ("_divergence_fwd_kernel", "_divergence_bwd_kernel"), 1.002),
    # (its forward reads each row twice: every access 1.4x; at V = 151936 a row pair is
    # 608 KB, so on a GPU the second read comes from DRAM, not cache)
    "token_divergence fwd+bwd (jsd), [64, 8192] bf16": (
        token_divergence_jsd, ("_divergence_fwd_kernel", "_divergence_bwd_kernel"), 1.002),
    "linear_token_divergence fwd+bwd (forward_kl), the kernels' share, [64, 8192] bf16": (
        linear_token_divergence_kl, ("_divergence_fwd_kernel", "_divergence_bwd_kernel"),
        1.002),
    "linear_logprobs fwd+bwd, the log-prob kernels' share, [64, 8192] bf16": (
        linear_logprobs_forward_backward, ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"),
        1.002),
    "ppo_loss fwd+bwd (KL, entropy), [16, 1024] fp32": (
        ppo_loss_forward_backward, ("_ppo_fwd_kernel", "_ppo_reduce_kernel",
                                    "_ppo_bwd_kernel"), 1.005),  # + the per-row stats
    "ppo_loss fwd+bwd (gspo, KL, entropy), [16, 1024] fp32": (
        ppo_loss_gspo_forward_backward, ("_ppo_sequence_kernel", "_ppo_fwd_kernel",
                                         "_ppo_reduce_kernel", "_ppo_bwd_kernel"), 1.005),
    "linear_ppo_loss fwd+bwd (KL, entropy), the kernels' share, [64, 2048] bf16": (
        linear_ppo_loss_forward_backward, LINEAR_PPO_LAUNCHES, 1.002),
    "linear_ppo_loss's token gradients (KL, entropy), [4, 16] fp32, that kernel's share": (
        linear_ppo_loss_token_grads, LINEAR_PPO_LAUNCHES, 1.002, ("_ppo_token_grad_kernel",)),
    "masked_mean fwd+bwd (dim=-1), [16, 1024] fp32": (
        masked_mean_forward_backward, ("_masked_partial_stats_kernel",
                                       "_masked_merge_stats_kernel", "_masked_mean_bwd_kernel"),
        1.002),
    "masked_whiten fwd, [16, 1024] fp32": (
        masked_whiten_forward, ("_masked_partial_stats_kernel", "_masked_merge_stats_kernel",
                                "_whiten_fwd_kernel"), 1.002),
    "masked_whiten bwd, [16, 1024] fp32": (
        masked_whiten_backward, ("_whiten_bwd_partial_kernel", "_whiten_bwd_kernel"), 1.002),
    "sequence_logps fwd+bwd, [16, 1024] fp32": (
        sequence_logps_forward_backward, ("_sequence_logps_fwd_kernel",
                                          "_sequence_logps_bwd_kernel"), 1.002),
    "optimal_token_baseline fwd, [16, 1024] fp32, groups of 4": (
        optimal_token_baseline_forward, ("_optimal_token_baseline_kernel",), 1.002),
    "dpo_loss fwd+bwd (sigmoid), [4096] pairs fp32": (
        dpo_loss_forward_backward, ("_dpo_fwd_kernel", "_dpo_bwd_kernel"), 1.002),
    "simpo_loss fwd+bwd, [4096] pairs fp32": (
        simpo_loss_forward_backward, ("_simpo_fwd_kernel", "_simpo_bwd_kernel"), 1.002),
    "orpo_loss fwd+bwd, [4096] pairs fp32": (
        orpo_loss_forward_backward, ("_orpo_fwd_kernel", "_orpo_bwd_kernel"), 1.002),
    "cpo_loss fwd+bwd (sigmoid + NLL), [4096] pairs fp32": (
        cpo_loss_forward_backward, ("_cpo_fwd_kernel", "_cpo_bwd_kernel"), 1.002),
    "kto_loss fwd+bwd (reference, KL), [4096] examples fp32": (
        kto_loss_forward_backward, ("_kto_fwd_kernel", "_kto_bwd_kernel"), 1.002),
    "group_advantages (grpo), [4096] scores fp32, groups of 8": (
        group_advantages_forward, ("_group_advantages_kernel",), 1.002),
    # (the scan reads each token's successor again: 1.27x in accesses, a cache hit)
    "gae fwd, [16, 1024] fp32": (gae_forward, ("_gae_kernel",), 1.002),
}.items()}
