"""Benchmark of `rlhf_fast.masked_whiten` against what trainers write instead.

Inputs: the ``gae`` suite's fp32 values ``[B, T]`` and right-padded bool mask (each row
a prefix of valid tokens, one row full), at its shapes, and for the backward a random
upstream gradient ``[B, T]``. Modes: ``fwd`` (under no_grad, as a trainer whitens its
advantages) and ``fwd+bwd`` (the gradient w.r.t. the values, for a loss that whitens
what it differentiates; the headline run's, which so compiles and gates the backward
kernels on a GPU).

Providers (same inputs, same process):

* ``rlhf_fast``: ``rlhf_fast.masked_whiten(x, mask)``: unbiased (n - 1) variance, 0 at
  masked positions.
* ``eager``: TRL's ``masked_whiten``: ``masked_mean`` (sum(x * mask) / sum(mask)),
  ``masked_var`` with its n / (n - 1) correction (without its two checks of the mask
  count, host syncs), ``(x - mean) * rsqrt(var + 1e-8)``, then times the mask, so that
  padding is 0 as in ours (TRL's PPO trainer zeroes it after the call).
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Every provider is first checked against ``rlhf_fast.reference.masked_whiten`` in float64
on the same inputs (relative error <= 1e-5; in ``fwd+bwd`` the gradient too); one that
does not match is reported "wrong" and not timed.

Bytes-moved floor (GB/s column), with N = B * T: read x (fp32) and the mask, write the
output (fp32): 4 N + N + 4 N = 9 N. The minimum: rlhf_fast's kernel reads x and the mask
twice (statistics pass, then output pass), up to 14 N, and is measured against 9 N all
the same. The backward adds the upstream gradient, x and the mask read, the gradient
written: 13 N (rlhf_fast reads the three twice: the gradient's two sums, then the
gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import advantage, peers
from rlhf_fast.benchmarks.cases import Case

OP = "masked_whiten"
#: Added to the variance: TRL's, and rlhf_fast.masked_whiten's default.
WHITEN_EPS = 1e-8


# --------------------------------------------------------------------------- providers


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's masked_mean: sum(x * mask) / sum(mask)."""
    return (x * mask).sum() / mask.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's masked_var(unbiased=True), without its checks of sum(mask) (host syncs)."""
    centered = x - masked_mean(x, mask)
    count = mask.sum()
    return masked_mean(centered**2, mask) * (count / (count - 1))


def eager_masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's masked_whiten, then times the mask: 0 at padded positions, as ours."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + WHITEN_EPS) * mask


def rlhf_fast_masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return rlhf_fast.masked_whiten(x, mask, eps=WHITEN_EPS)


def compiled_masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return peers.compiled(eager_masked_whiten)(x, mask)


PROVIDERS: dict[str, Callable[..., torch.Tensor]] = {
    "rlhf_fast": rlhf_fast_masked_whiten,
    "eager": eager_masked_whiten,
    "compile": compiled_masked_whiten,
}


# --------------------------------------------------------------------------- one case


ARGS = ("values", "mask")


def reference_masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return reference.masked_whiten(values, mask, eps=WHITEN_EPS)


SUITE = advantage.suite(
    # the floor (module docstring): 9 N bytes forward, 13 N more backward
    OP, PROVIDERS, reference=reference_masked_whiten, args=ARGS, outputs=("whitened",),
    bytes_per_element=4 + 1 + 4,
    backward=advantage.Backward("values", 4 + 4 + 1 + 4, output_shape=lambda shape: shape),
)


def test_masked_whiten(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
