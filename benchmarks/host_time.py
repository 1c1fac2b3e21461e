"""Host time per call of each op, as a multiple of one bare aten op in the same run.

At small and medium batch sizes a fused op's cost on the GPU can be its host overhead:
the Python checks, the torch ops around the kernels and the autograd bookkeeping. This
times each op's forward + backward on small CPU tensors with its Triton launches skipped
(what is left is the host's share, Triton's own launcher excepted), and divides by the
time of ``torch.add`` on two small tensors measured in the same process, so the ratio
(bare-op equivalents) carries from machine to machine. The least of many repetitions,
the unit measured beside each op: another process on the cores only adds time.

The table also times each call with its forward under ``torch.compile(fullgraph=True)``
(the custom ops in one graph; the backward runs the compiled backward graph), to show
what compiling takes off the host; CUDA graphs, which would take off the rest, need a GPU.

    python -m rlhf_fast.benchmarks.host_time
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from rlhf_fast.benchmarks.memory import launches_skipped


def least_seconds(fn: Callable[[], Any], repeats: int = 120, inner: int = 5) -> float:
    """The least over `repeats` of the mean time of `inner` back-to-back calls: another
    process on the cores only ever adds time, so the least is the call's own cost."""
    fn()  # warm-up: first-call caches
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return min(samples)


def bare_op() -> Callable[[], Any]:
    a, b = torch.ones(8), torch.ones(8)
    return lambda: torch.add(a, b)


Wrap = Callable[[Callable[[], Any]], Callable[[], Any]]


def plain(forward: Callable[[], Any]) -> Callable[[], Any]:
    return forward


def compiled(forward: Callable[[], Any]) -> Callable[[], Any]:
    """The forward under ``torch.compile(fullgraph=True)``: Inductor where a C++ compiler
    is at hand, else aot_eager (the same graphs, run op by op)."""
    return torch.compile(forward, fullgraph=True, backend=compile_backend())


def compile_backend() -> str:
    import shutil

    return "inductor" if any(shutil.which(cc) for cc in ("g++", "c++", "clang++")) \
        else "aot_eager"


def ppo_loss_call(wrap: Wrap) -> Callable[[], Any]:
    import rlhf_fast

    logp = torch.zeros(4, 16, requires_grad=True)
    old, adv, mask = torch.zeros(4, 16), torch.ones(4, 16), torch.ones(4, 16, dtype=torch.bool)
    forward = wrap(lambda: rlhf_fast.ppo_loss(logp, old, adv, mask, ref_logp=old,
                                              kl_coef=0.1).loss)
    return lambda: torch.autograd.grad(forward(), logp)


def logprobs_call(wrap: Wrap) -> Callable[[], Any]:
    import rlhf_fast

    logits = torch.zeros(4, 16, 32, requires_grad=True)
    labels = torch.zeros(4, 16, dtype=torch.long)
    upstream = (torch.ones(4, 16), torch.ones(4, 16))
    # check_labels=False: CUDA's default (the check needs a sync there)
    forward = wrap(lambda: rlhf_fast.logprobs(logits, labels, return_entropy=True,
                                              check_labels=False))
    return lambda: torch.autograd.grad(forward(), logits, upstream)


def dpo_loss_call(wrap: Wrap) -> Callable[[], Any]:
    import rlhf_fast

    chosen = torch.zeros(4, requires_grad=True)
    other = torch.zeros(4)
    forward = wrap(lambda: rlhf_fast.dpo_loss(chosen, other, other, other).loss)
    return lambda: torch.autograd.grad(forward(), chosen)


def gae_call(wrap: Wrap) -> Callable[[], Any]:
    import rlhf_fast

    x, mask = torch.zeros(4, 16), torch.ones(4, 16, dtype=torch.bool)
    return wrap(lambda: rlhf_fast.gae(x, x, mask))


#: name -> (the call, its budget in bare-op equivalents: about twice what it measures on
#: an idle machine, so that a loaded CI machine does not fail it, while a regression to
#: a per-call re-check or a storm of small ops does)
CASES: dict[str, tuple[Callable[[Wrap], Callable[[], Any]], float]] = {
    "ppo_loss fwd+bwd (KL)": (ppo_loss_call, 350.0),
    "logprobs fwd+bwd (+ entropy)": (logprobs_call, 250.0),
    "dpo_loss fwd+bwd": (dpo_loss_call, 250.0),
    "gae": (gae_call, 50.0),
}


def table(with_compiled: bool = False) -> list[dict[str, Any]]:
    """A row per case: its host time plain (within `budget`) and, `with_compiled`, with
    its forward compiled (`compiled`: Dynamo's guards and the compiled graphs' wrappers
    in place of the Python around the kernels)."""
    with launches_skipped():
        rows = []
        for name, (case, budget) in CASES.items():
            # the unit measured beside each case: a load that comes and goes meets both
            unit = least_seconds(bare_op())
            seconds = least_seconds(case(plain))
            row = dict(case=name, microseconds=round(seconds * 1e6, 1),
                       bare_ops=round(seconds / unit, 1), budget=budget,
                       bare_op_microseconds=round(unit * 1e6, 2))
            if with_compiled:
                torch._dynamo.reset()
                seconds = least_seconds(case(compiled))
                row.update(compiled_microseconds=round(seconds * 1e6, 1),
                           compiled_bare_ops=round(seconds / unit, 1))
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    rows = table(with_compiled=True)
    print(f"one bare aten op (torch.add, 8 elements): {rows[0]['bare_op_microseconds']} us; "
          f"compiled with backend {compile_backend()!r}")
    print("| op | host time per call (us) | bare-op equivalents (budget) | compiled (us) "
          "| compiled, bare-op equivalents |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['case']} | {row['microseconds']} | {row['bare_ops']} "
              f"({row['budget']}) | {row['compiled_microseconds']} | "
              f"{row['compiled_bare_ops']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
