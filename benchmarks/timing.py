"""How every suite measures: run time, peak memory and the rates its roofline is taken from.

* time: on CUDA, ``triton.testing.do_bench`` (median and quartiles over calls, L2 flushed
  before each call, CUDA events around each call). When a call needs fresh state that must
  not be timed (a new graph for a backward-only timing, a fresh copy of inputs that an
  in-place op overwrites) the same method runs with an untimed ``setup`` before each call.
  On the CPU, ``time.perf_counter`` over a few calls: such numbers only prove the harness.
* memory: peak allocated bytes above what was allocated just before the call (the
  inputs, and whatever ``setup`` built), from ``torch.cuda.max_memory_allocated``.
* roofline: bytes that must move over the measured device-to-device copy bandwidth, or
  for GEMM-bound ops the FLOPs that must run over the measured bf16 GEMM rate.

Nothing here imports pytest: `cases` puts these measurements into pytest results.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

MIB = 1024**2
GIB = 1024**3


def sync(device: torch.device | str) -> None:
    """Wait for `device`'s queued kernels (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[..., Any], device: torch.device) -> Callable[..., None]:
    """`fn` followed by a device sync, so that wall-clock timers (pytest-benchmark) see the
    kernels' time and not only their launch."""

    def run(*args: Any) -> None:
        fn(*args)
        sync(device)

    return run


def measure_copy_bandwidth(device: torch.device | str) -> float:
    """Achieved device memory bandwidth of a plain copy, in bytes/s (read + write counted).

    On CUDA: ``dst.copy_(src)`` of a 1 GiB buffer timed with ``triton.testing.do_bench``
    (median); this is the practical roofline the memory-bound ops are compared against.
    On the CPU: a 16 MiB copy timed with ``time.perf_counter``; meaningless as a roofline
    and reported as such.
    """
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        src = torch.empty(GIB, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
        del src, dst
        torch.cuda.empty_cache()
        return 2 * GIB / (ms * 1e-3)
    size = 16 * MIB
    src = torch.ones(size, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * size / sorted(times)[len(times) // 2]


def _quantiles_ms(times_ms: Sequence[float]) -> dict[str, float]:
    q = torch.tensor(list(times_ms), dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)
    )
    return {"median_ms": float(q[0]), "p25_ms": float(q[1]), "p75_ms": float(q[2])}


def _cuda_time_with_setup(
    fn: Callable[[Any], Any],
    setup: Callable[[], Any],
    warmup_ms: float,
    rep_ms: float,
) -> list[float]:
    """``do_bench``'s method with an untimed ``setup()`` before each call of ``fn(state)``.

    As in ``do_bench``: the L2 cache is flushed before each call, each call sits between
    two CUDA events, the number of calls follows from a 5-call estimate. ``setup`` and
    the flush are enqueued before the start event, so their GPU work is not timed.
    """
    flush = torch.empty(64 * MIB, dtype=torch.int32, device="cuda")  # 256 MiB > any L2

    def one_call(timed: bool) -> tuple[torch.cuda.Event, torch.cuda.Event] | None:
        state = setup()
        flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        del state
        return (start, end) if timed else None

    one_call(timed=False)
    torch.cuda.synchronize()
    estimate = [one_call(timed=True) for _ in range(5)]
    torch.cuda.synchronize()
    estimate_ms = sum(s.elapsed_time(e) for s, e in estimate) / 5  # type: ignore[union-attr]
    estimate_ms = max(estimate_ms, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        one_call(timed=False)
    events = [one_call(timed=True) for _ in range(max(1, int(rep_ms / estimate_ms)))]
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]  # type: ignore[union-attr]


def time_fn(
    fn: Callable[..., Any],
    *,
    device: torch.device | str,
    setup: Callable[[], Any] | None = None,
    warmup_ms: float = 25,
    rep_ms: float = 200,
    cpu_repeats: int = 5,
) -> dict[str, float]:
    """Median and quartiles of the run time of ``fn``, in milliseconds.

    Args:
        fn: the timed call. Without ``setup`` it is called as ``fn()``; with it, as
            ``fn(setup())``, the ``setup()`` call not being timed.
        device: where ``fn`` runs. CUDA uses ``triton.testing.do_bench`` (``setup=None``)
            or the same method with the untimed setup; CPU uses ``time.perf_counter``.
        setup: builds per-call state, e.g. the forward graph for a backward-only timing
            (so ``bwd`` is measured directly, not as ``fwd+bwd - fwd``), or a fresh copy
            of inputs that ``fn`` overwrites.
        warmup_ms, rep_ms: ``do_bench``'s warmup and repetition budgets (CUDA).
        cpu_repeats: timed calls on the CPU, after one warmup call.

    Returns:
        ``{"median_ms", "p25_ms", "p75_ms"}``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if setup is None:
            from triton.testing import do_bench

            med, p25, p75 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.25, 0.75])
            return {"median_ms": float(med), "p25_ms": float(p25), "p75_ms": float(p75)}
        return _quantiles_ms(_cuda_time_with_setup(fn, setup, warmup_ms, rep_ms))

    def call() -> float:
        if setup is None:
            start = time.perf_counter()
            fn()
        else:
            state = setup()
            start = time.perf_counter()
            fn(state)
        return (time.perf_counter() - start) * 1e3

    call()
    return _quantiles_ms([call() for _ in range(max(1, cpu_repeats))])


def peak_memory_above(
    fn: Callable[..., Any],
    device: torch.device | str,
    setup: Callable[[], Any] | None = None,
) -> int | None:
    """Peak bytes allocated while ``fn`` runs, above what was allocated just before it.

    What is allocated before the call (the inputs, and the state ``setup()`` returns,
    passed as ``fn(state)``) is the baseline; outputs and temporaries of ``fn`` count.
    Returns None on the CPU (reported as "n/a").
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    state = setup() if setup is not None else None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn(state) if setup is not None else fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, state
    return int(peak)


#: Side of the square bf16 GEMM whose rate is the roofline (CUDA; the CPU one is smaller).
GEMM_RATE_SIZE = 8192
GEMM_RATE_SIZE_CPU = 512


@functools.cache
def gemm_rate(device: str) -> float:
    """The device's bf16 GEMM rate in FLOP/s, measured once per session (per device).

    CUDA: ``torch.mm`` of two ``GEMM_RATE_SIZE``-square bf16 matrices into a preallocated
    output, median of ``time_fn`` (``triton.testing.do_bench``). CPU: the same at
    ``GEMM_RATE_SIZE_CPU`` with ``time.perf_counter``; meaningless as a roofline.
    """
    dev = torch.device(device)
    size = GEMM_RATE_SIZE if dev.type == "cuda" else GEMM_RATE_SIZE_CPU
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn((size, size), generator=gen, device=dev).to(torch.bfloat16)
    b = torch.randn((size, size), generator=gen, device=dev).to(torch.bfloat16)
    out = torch.empty((size, size), device=dev, dtype=torch.bfloat16)
    timing = time_fn(lambda: torch.mm(a, b, out=out), device=dev)
    return 2 * size**3 / (timing["median_ms"] * 1e-3)  # a, b, out freed on return


def gemm_roofline_columns(
    *, gemms: int, floor_gemms: int, gemm_flops: int, median_ms: float, rate: float
) -> dict[str, Any]:
    """The roofline fields of a GEMM-bound row: the provider runs `gemms` GEMMs of
    `gemm_flops` FLOPs each, any implementation must run `floor_gemms`; `rate` is the
    measured bf16 GEMM rate (FLOP/s). ``frac_gemm_rate``: how fast the provider runs its
    own GEMMs; ``frac_roofline``: the floor's FLOPs over the rate and the time."""
    seconds = median_ms * 1e-3
    flops = gemms * gemm_flops
    floor = floor_gemms * gemm_flops
    return {
        "gemms": gemms,
        "flops": flops,
        "tflops": flops / seconds / 1e12,
        "gemm_rate_tflops": rate / 1e12,
        "frac_gemm_rate": flops / seconds / rate,
        "floor_flops": floor,
        "frac_roofline": floor / rate / seconds,
    }
