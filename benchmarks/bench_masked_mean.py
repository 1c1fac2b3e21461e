"""Benchmark of `rlhf_fast.masked_mean` along the tokens of each row, against what
trainers write instead.

Inputs: the ``gae`` suite's fp32 values ``[B, T]`` and right-padded bool mask (each row
a prefix of valid tokens, one row full), at its shapes, and for the backward a random
upstream gradient ``[B]``. The op: each row's mean over its valid tokens (``dim=-1``,
the per-sequence mean of a seq-mean loss aggregation). Modes: ``fwd`` (under no_grad)
and ``fwd+bwd`` (the gradient w.r.t. the values).

Providers (same inputs, same process):

* ``rlhf_fast``: ``rlhf_fast.masked_mean(x, mask, dim=-1)``.
* ``eager``: TRL's / verl's ``masked_mean(x, mask, axis=-1)``:
  ``(x * mask).sum(-1) / mask.sum(-1)``.
* ``compile``: ``torch.compile`` of ``eager`` (GPU only; skipped in CPU quick mode).

Every provider is first checked against ``rlhf_fast.reference.masked_mean`` in float64
on the same inputs (relative error <= 1e-5; in ``fwd+bwd`` the gradient too); one that
does not match is reported "wrong" and not timed.

Bytes-moved floor (GB/s column), with N = B * T: read x (fp32) and the mask, 5 N (the
[B] means aside); the backward reads the mask and writes the gradient (fp32), 5 N more.
"""

from __future__ import annotations

from typing import Any

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.benchmarks import advantage, cases
from rlhf_fast.benchmarks.cases import Case

OP = "masked_mean"


def eager_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's / verl's masked_mean along the last dim: sum(x * mask) / sum(mask)."""
    return (x * mask).sum(-1) / mask.sum(-1)


def rlhf_fast_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return rlhf_fast.masked_mean(x, mask, dim=-1)


def reference_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return reference.masked_mean(x, mask, dim=-1)


PROVIDERS = {"rlhf_fast": rlhf_fast_masked_mean, **cases.eager_and_compiled(eager_masked_mean)}


SUITE = advantage.suite(
    # the floor (module docstring): 5 N bytes forward, 5 N more backward
    OP, PROVIDERS, reference=reference_masked_mean, args=("values", "mask"),
    outputs=("mean",), bytes_per_element=4 + 1,
    backward=advantage.Backward("values", 1 + 4, output_shape=lambda shape: shape[:1]),
)


def test_masked_mean(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
