"""Peak extra memory of each op's launcher path at the headline shapes, without a GPU.

Every op runs for real up to its kernel launches on meta tensors (shapes and dtypes, no
data, no memory): the Triton launches are skipped and the torch ops around them (GEMMs,
casts, chunk buffers, outputs) allocate meta tensors. A dispatch mode records each
storage the op creates and when it is freed; the peak of the live bytes is the op's peak
memory above its inputs on a GPU at that shape (the caching allocator's rounding aside).
What the kernels write into those buffers does not change their sizes, so the count is
exact for the launcher path, and deterministic: a CI budget, not a timing.

    python -m rlhf_fast.benchmarks.memory      # the table the README quotes (a test
                                               # checks that it does, `markdown`)

Each row also states the op's documented bound (`FORMULAS`, the README's formulas): CI
checks that the measured peak stays within it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rlhf_fast.benchmarks.report import markdown_table
from rlhf_fast.ops.library import NAMESPACE, launch_within

GB = 1e9


class PeakMemory(TorchDispatchMode):
    """Within the block: the peak bytes of the storages created by torch ops (views and
    in-place ops create none), freed ones subtracted as they die.

    A storage is known by its identity (its Python object, which lives exactly as long as
    the storage does), never by its address: a new storage allocated where a freed one
    was, or where one of the storages that existed before the block was, is a new
    allocation and counts."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[weakref.ref, int]] = {}  # id(storage) -> (ref, bytes)
        self.outside: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        if getattr(func, "namespace", None) == NAMESPACE:
            out = launch_within(self, func, args, kwargs or {})
        else:
            out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor.untyped_storage())
        self.peak = max(self.peak, self.current)
        return out

    @staticmethod
    def _known(table: dict[int, Any], storage: torch.UntypedStorage) -> bool:
        entry = table.get(id(storage))
        ref = entry[0] if isinstance(entry, tuple) else entry
        return ref is not None and ref() is storage

    def _add(self, storage: torch.UntypedStorage) -> None:
        if self._known(self.live, storage) or self._known(self.outside, storage):
            return
        key, size = id(storage), storage.nbytes()
        # freed the moment the storage dies (its id may then be reused: the entry is gone)
        self.live[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), size)
        self.current += size

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        # storages that exist already (the inputs, the model) are never counted
        with warnings.catch_warnings():  # isinstance() on deprecated torch objects
            warnings.simplefilter("ignore")
            storages = [obj.untyped_storage() for obj in gc.get_objects()
                        if isinstance(obj, torch.Tensor)]
        for storage in storages:
            key = id(storage)
            self.outside[key] = weakref.ref(
                storage, lambda _, key=key: self.outside.pop(key, None))
        return super().__enter__()


@contextlib.contextmanager
def launches_skipped() -> Iterator[None]:
    """Within the block, every Triton launch returns at once (meta tensors have no data)
    and the ops take their Triton path whatever the device."""
    import triton.runtime.jit as jit

    from rlhf_fast.benchmarks.kernel_resources import _op_modules
    from rlhf_fast.ops import dispatch

    owners: list[Any] = [jit.JITFunction]
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        owners.append(InterpretedFunction)
    # kernel[grid](...) calls run (triton >= 3.4's interpreter too; triton 3.3's
    # InterpretedFunction has none: its __getitem__ launches)
    patched = [(owner, "run", lambda self, *args, **kwargs: None) if hasattr(owner, "run")
               else (owner, "__getitem__", lambda self, grid: lambda *args, **kwargs: None)
               for owner in owners]
    # the GEMM forms of a CUDA device with torch >= 2.8 (its probe needs data)
    from rlhf_fast.kernels import linear_logprobs

    patched.append((linear_logprobs, "has_fp32_output_gemm",
                    lambda device, dtype: dtype in linear_logprobs.LOW_PRECISION))
    patched += [(module, "use_triton", lambda tensor: True) for module in _op_modules(dispatch)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    try:
        for owner, name, value in patched:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def peak_bytes(run: Callable[[], Any]) -> int:
    """The peak extra bytes of `run()` (on meta tensors, launches skipped); what it
    returns is dropped inside the measurement, so only its peak counts."""
    with launches_skipped(), PeakMemory() as memory:
        run()
    return memory.peak


# --------------------------------------------------------------------------- the cases

META = torch.device("meta")
BF16 = torch.bfloat16


def _leaf(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META, requires_grad=True)


def _labels(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.long, device=META)


def logprobs_case(n: int, vocab: int, inplace: bool) -> Callable[[], Any]:
    import rlhf_fast

    base = _leaf(n, vocab)
    logits = base * 1 if inplace else base  # in place: an op's output, made before (the
    labels = _labels(n)                     # lm_head's, the caller's memory)

    def run() -> None:
        logp, entropy = rlhf_fast.logprobs(logits, labels, return_entropy=True,
                                           inplace_backward=inplace, check_labels=False)
        torch.autograd.grad((logp.sum() + entropy.sum()), logits)

    return run


def next_token_logprobs_case(b: int, t: int, vocab: int, sliced: bool) -> Callable[[], Any]:
    """The log-prob of each next token from [B, T, V] logits, as a trainer takes it: the
    labels shifted left (the last position ignored), or the logits sliced to
    `logits[:, :-1]`, whose backward autograd pads into a second full-size gradient."""
    import torch.nn.functional as F

    import rlhf_fast

    logits, input_ids = _leaf(b, t, vocab), _labels(b, t)

    def run() -> None:
        if sliced:
            logp = rlhf_fast.logprobs(logits[:, :-1], input_ids[:, 1:], check_labels=False)
        else:
            labels = F.pad(input_ids[:, 1:], (0, 1), value=-100)
            logp = rlhf_fast.logprobs(logits, labels, check_labels=False)
        torch.autograd.grad(logp.sum(), logits)

    return run


def linear_logprobs_case(n: int, dim: int, vocab: int) -> Callable[[], Any]:
    import rlhf_fast

    hidden, weight, labels = _leaf(n, dim), _leaf(vocab, dim), _labels(n)

    def run() -> None:
        logp = rlhf_fast.linear_logprobs(hidden, weight, labels, check_labels=False)
        torch.autograd.grad(logp.sum(), (hidden, weight))

    return run


def linear_ppo_loss_case(n: int, dim: int, vocab: int) -> Callable[[], Any]:
    import rlhf_fast

    hidden, weight, labels = _leaf(1, n, dim), _leaf(vocab, dim), _labels(1, n)
    per_token = {k: torch.empty(1, n, device=META) for k in ("old_logp", "advantages")}
    mask = torch.empty(1, n, dtype=torch.bool, device=META)

    def run() -> None:
        out = rlhf_fast.linear_ppo_loss(hidden, weight, labels, per_token["old_logp"],
                                        per_token["advantages"], mask, check_labels=False)
        torch.autograd.grad(out.loss, (hidden, weight))

    return run


def token_divergence_case(n: int, vocab: int, inplace: bool) -> Callable[[], Any]:
    import rlhf_fast

    student, labels = _leaf(n, vocab), _labels(n)
    teacher = torch.empty(n, vocab, dtype=BF16, device=META)
    # in place: logits an op made (the lm_head's output, in a model), before the count
    x = student * 1 if inplace else student

    def run() -> None:
        out = rlhf_fast.token_divergence(x, teacher, labels, inplace_backward=inplace)
        torch.autograd.grad(out.sum(), x)

    return run


def linear_token_divergence_case(n: int, dim: int, vocab: int) -> Callable[[], Any]:
    import rlhf_fast

    hidden, weight, labels = _leaf(1, n, dim), _leaf(vocab, dim), _labels(1, n)
    teacher_hidden = torch.empty(1, n, dim, dtype=BF16, device=META)
    teacher_weight = torch.empty(vocab, dim, dtype=BF16, device=META)

    def run() -> None:
        out = rlhf_fast.linear_token_divergence(hidden, weight, teacher_hidden,
                                                teacher_weight, labels)
        torch.autograd.grad(out.sum(), (hidden, weight))

    return run


def ppo_loss_case(b: int, t: int) -> Callable[[], Any]:
    import rlhf_fast

    logp, entropy = _leaf(b, t, dtype=torch.float32), _leaf(b, t, dtype=torch.float32)
    old_logp, ref_logp, advantages = (torch.empty(b, t, device=META) for _ in range(3))
    mask = torch.empty(b, t, dtype=torch.bool, device=META)

    def run() -> None:
        out = rlhf_fast.ppo_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp,
                                 entropy=entropy, kl_coef=0.1, entropy_coef=0.01)
        torch.autograd.grad(out.loss, (logp, entropy))

    return run


N_LOGITS, V_QWEN, V_LLAMA, D = 8 * 1024, 151936, 128256, 4096
CHUNK = 1 << 27  # kernels.linear_logprobs.CHUNK_ELEMENTS

#: name -> (the case, its documented bound in bytes, the bound as the README states it)
CASES: dict[str, tuple[Callable[[], Callable[[], Any]], int, str]] = {
    "logprobs fwd+bwd, [8192, 151936] bf16": (
        lambda: logprobs_case(N_LOGITS, V_QWEN, inplace=False),
        2 * N_LOGITS * V_QWEN + 64 * N_LOGITS,
        "the gradient (2 N V) + O(N)"),
    "logprobs fwd+bwd inplace_backward, [8192, 151936] bf16": (
        lambda: logprobs_case(N_LOGITS, V_QWEN, inplace=True),
        64 * N_LOGITS,
        "O(N): the gradient overwrites the logits"),
    "logprobs fwd+bwd, shifted labels, [8, 1024, 151936] bf16": (
        lambda: next_token_logprobs_case(8, 1024, V_QWEN, sliced=False),
        2 * N_LOGITS * V_QWEN + 64 * N_LOGITS,
        "the gradient (2 N V) + O(N)"),
    "logprobs fwd+bwd, logits[:, :-1], [8, 1024, 151936] bf16": (
        lambda: next_token_logprobs_case(8, 1024, V_QWEN, sliced=True),
        2 * 2 * N_LOGITS * V_QWEN + 64 * N_LOGITS,
        "the slice's gradient and autograd's full-size copy of it (2 x 2 N V) + O(N): "
        "shift the labels instead"),
    "token_divergence fwd+bwd (jsd), [8192, 151936] bf16": (
        lambda: token_divergence_case(N_LOGITS, V_QWEN, inplace=False),
        2 * N_LOGITS * V_QWEN + 64 * N_LOGITS,
        "the student's gradient (2 N V) + O(N): no fp32 copy of either model's logits"),
    "token_divergence fwd+bwd inplace_backward, [8192, 151936] bf16": (
        lambda: token_divergence_case(N_LOGITS, V_QWEN, inplace=True),
        64 * N_LOGITS,
        "O(N): the gradient overwrites the student's logits"),
    "linear_logprobs fwd+bwd, N 8192, D 4096, V 128256 bf16": (
        lambda: linear_logprobs_case(N_LOGITS, D, V_LLAMA),
        2 * CHUNK + (4 + 2 + 2) * N_LOGITS * D + 2 * V_LLAMA * D + 64 * N_LOGITS,
        "one logits chunk (2 * 2^27) + fp32 and bf16 d hidden and zeroed hidden (8 N D) "
        "+ d weight (2 V D) + O(N)"),
    "linear_ppo_loss fwd+bwd, N 8192, D 4096, V 128256 bf16": (
        lambda: linear_ppo_loss_case(N_LOGITS, D, V_LLAMA),
        2 * CHUNK + 6 * V_LLAMA * D + 4 * N_LOGITS * D + 64 * N_LOGITS,
        "one logits chunk + the fp32 d weight accumulator (4 V D) and its bf16 rounding "
        "(2 V D) + d hidden saved and scaled (4 N D) + O(N): the backward's scaled "
        "gradients (2 V D + 2 N D) replace the saved ones"),
    "linear_token_divergence fwd+bwd (jsd), N 8192, D 4096, V 128256 bf16": (
        lambda: linear_token_divergence_case(N_LOGITS, D, V_LLAMA),
        2 * CHUNK + (4 + 2 + 2) * N_LOGITS * D + 2 * V_LLAMA * D + 64 * N_LOGITS,
        "one logits chunk of each model (2 * 2^26 each) + fp32 and bf16 d hidden and "
        "zeroed hidden (8 N D) + d weight (2 V D) + O(N)"),
    "ppo_loss fwd+bwd, [512, 8192] fp32": (
        lambda: ppo_loss_case(512, 8192),
        2 * 4 * 512 * 8192 + 64 * 512 * 8192 // 1024 + 4096,
        "the two gradients (8 B T) + O(B T / 1024)"),
}


def table() -> list[dict[str, Any]]:
    rows = []
    for name, (case, bound, formula) in CASES.items():
        measured = peak_bytes(case())
        rows.append(dict(case=name, peak_bytes=measured, bound_bytes=bound, formula=formula))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """`table()`'s rows as the markdown table this tool prints and the README quotes."""
    return markdown_table(
        ["op, shape", "peak extra memory (GB)", "bound (GB)", "bound, as documented"],
        ([row["case"], f"{row['peak_bytes'] / GB:.3f}", f"{row['bound_bytes'] / GB:.3f}",
          row["formula"]] for row in rows))


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print(markdown(table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
