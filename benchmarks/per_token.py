"""What the per-token suites from logits share (``logprobs``, ``token_divergence``): their
sizes, case labels and correctness tolerances, the ``rlhf_fast`` provider with and
without ``inplace_backward``, and the `Suite` built from a suite's own inputs, gate and
timed call, its floor some logits-sized passes over ``[N, V]``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhf_fast.benchmarks import cases
from rlhf_fast.benchmarks.cases import Case

IGNORE_INDEX = -100
MODES = ("fwd", "bwd", "fwd+bwd")
#: Headline shapes (DESIGN.md): 8 sequences of 1024 tokens (Qwen vocab) and of 2048 (Llama 3).
GPU_SHAPES = [((8 * 1024, 151936), torch.bfloat16), ((8 * 2048, 128256), torch.bfloat16)]
QUICK_SHAPES = [
    ((64, 1000), torch.bfloat16),
    ((128, 4099), torch.bfloat16),
    ((128, 4099), torch.float32),
]
#: Relative-error tolerance of the correctness gate, per input dtype (a bf16 input's
#: gradient is bf16).
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
#: Rows compared against the float64 reference when there are more than GATE_ALL_ROWS.
GATE_ROWS = 64
GATE_ALL_ROWS = 256


def label(case: Case) -> str:
    """A case id's size part: N x V, the dtype's full name, the variant."""
    dtype = str(case.dtype).removeprefix("torch.")
    return f"{case.shape[0]}x{case.shape[1]}-{dtype}-{case.variant}"


def rlhf_fast_providers(provider: Callable[[bool], cases.Fn]) -> dict[str, cases.Fn]:
    """The ``rlhf_fast`` and ``rlhf_fast-inplace`` providers: ``provider(inplace)``."""
    return {"rlhf_fast": provider(False), "rlhf_fast-inplace": provider(True)}


def suite(op: str, providers: dict[str, Any], variants: Sequence[str],
          make_inputs: Callable[[Any, torch.dtype, torch.device], Any], *,
          logits_passes: dict[str, int], **fields: Any) -> cases.Suite:
    """A per-token suite in every mode of `MODES`, its floor ``logits_passes[mode]``
    logits-sized ``[N, V]`` tensors moved. `fields`: its ``gate``, ``timed`` and other
    `cases.Suite` fields."""

    def bytes_moved(case: Case) -> int:
        return (logits_passes[case.mode] * case.shape[0] * case.shape[1]
                * torch.empty((), dtype=case.dtype).element_size())

    return cases.Suite(
        op, GPU_SHAPES, QUICK_SHAPES, MODES, providers, variants=variants,
        make_inputs=lambda case, device: make_inputs(case.shape, case.dtype, device),
        columns=cases.copy_bandwidth_columns(bytes_moved),
        label=label,
        **fields,
    )
