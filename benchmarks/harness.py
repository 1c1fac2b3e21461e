"""Shared benchmark harness: timing, peak memory, correctness gate, result writer.

Every ``bench_<op>.py`` suite uses these helpers so that all ops are measured the same way:

* time: on CUDA, ``triton.testing.do_bench`` (median and quartiles over calls, L2 flushed
  before each call, CUDA events around each call). When a call needs fresh state that must
  not be timed (a new graph for a backward-only timing, a fresh copy of inputs that an
  in-place op overwrites) the same method runs with an untimed ``setup`` before each call.
  On the CPU, ``time.perf_counter`` over a few calls: such numbers only prove the harness.
* memory: peak allocated bytes above what was allocated just before the call (the
  inputs, and whatever ``setup`` built), from ``torch.cuda.max_memory_allocated``.
* roofline: bytes that must move over the measured device-to-device copy bandwidth.
* correctness: a provider is timed only after its outputs match the float64 reference.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf_fast import reference

MIB = 1024**2
GIB = 1024**3

#: Column headers of the markdown table, in order.
TABLE_COLUMNS = (
    "op",
    "shape",
    "dtype",
    "provider",
    "mode",
    "median ms",
    "IQR ms",
    "peak MiB above inputs",
    "GB/s",
    "fraction of roofline",
    "status",
)


def _nvidia_smi_driver() -> str | None:
    """Driver version from ``nvidia-smi``, or None where it is not available."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if lines else None


def device_info() -> dict[str, Any]:
    """What the numbers were measured on: GPU (or "cpu"), driver, versions and date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # the harness itself does not need triton on the CPU
        triton_version = "not installed"
    gpu = torch.cuda.is_available()
    info: dict[str, Any] = {
        "gpu": gpu,
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "driver": (_nvidia_smi_driver() or "unknown") if gpu else "cpu",
        "cuda": torch.version.cuda if gpu else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return info


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[..., Any], device: torch.device) -> Callable[..., None]:
    """`fn` followed by a device sync, so that wall-clock timers (pytest-benchmark) see the
    kernels' time and not only their launch."""

    def run(*args: Any) -> None:
        fn(*args)
        _sync(device)

    return run


EXTRA_INFO_KEYS = ("variant", "median_ms", "p25_ms", "p75_ms", "peak_bytes", "bytes_moved", "gbps",
                   "frac_copy_bw", "status")


def record_extra_info(benchmark: Any, row: dict[str, Any]) -> None:
    """Copy a result row's numbers into pytest-benchmark's JSON (`extra_info`)."""
    for key in EXTRA_INFO_KEYS:
        if key in row:
            benchmark.extra_info[key] = row[key]
    benchmark.extra_info["rel_err"] = row.get("rel_err")


def report_outcome(row: dict[str, Any], outcome: str | None, provider: str) -> None:
    """Turn a case's outcome into the pytest result: skipped, xfail (a peer that failed the
    correctness gate) or fail (rlhf-fast itself failed it)."""
    if outcome == "skip":
        pytest.skip(row["status"])
    if outcome == "xfail":
        pytest.xfail(f"{provider} {row['status']}")
    if outcome == "fail":
        pytest.fail(f"{provider} {row['status']}: {row.get('rel_err')}")


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


def check_close(
    out: torch.Tensor | None, ref: torch.Tensor | None, tol: float
) -> tuple[bool, float]:
    """Relative error ``||out - ref|| / ||ref||`` (2-norms, float64) and whether <= tol.

    Where ``||ref|| == 0`` the absolute error ``||out||`` is used. A shape mismatch, a
    missing output or a NaN gives ``(False, inf or nan)``.
    """
    if out is None or ref is None:
        return False, math.inf
    if tuple(out.shape) != tuple(ref.shape):
        return False, math.inf
    o = out.detach().to(device="cpu", dtype=torch.float64)
    r = ref.detach().to(device="cpu", dtype=torch.float64)
    diff = float(torch.linalg.vector_norm(o - r))
    scale = float(torch.linalg.vector_norm(r))
    err = diff / scale if scale > 0 else diff
    return bool(err <= tol), err


#: Logits (elements) converted to float64 at a time by `reference_logprob_chunks`
#: (256 MiB), so a gate never makes a float64 copy of gigabytes of logits.
REF_CHUNK_ELEMENTS = 2**25


def reference_logprob_chunks(
    logits: torch.Tensor, targets: torch.Tensor, seq: int, *, grad: bool, ignore_index: int = -100
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The float64 reference log-probs of sequence `seq`, chunk by chunk.

    logits ``[rows, P', V]`` with ``P' >= P``, targets ``[rows, P]`` int64: position t
    predicts ``targets[seq, t]`` (callers pass shifted labels). Yields ``(start, stop,
    x, logp)``: the float64 leaf ``x = logits[seq, start:stop]`` (requiring grad when
    `grad`) and ``reference.logprobs(x, targets[seq, start:stop])``, at most
    ``REF_CHUNK_ELEMENTS`` logits per chunk.
    """
    positions, vocab = targets.shape[1], logits.shape[-1]
    step = max(1, REF_CHUNK_ELEMENTS // vocab)
    for start in range(0, positions, step):
        stop = min(start + step, positions)
        x = logits[seq, start:stop].detach().to(torch.float64).requires_grad_(grad)
        yield start, stop, x, reference.logprobs(
            x, targets[seq, start:stop], ignore_index=ignore_index
        )


def status_wrong(rel_err: float) -> str:
    """The status text of a provider that failed the correctness gate."""
    return f"wrong (rel err {rel_err:.2e})"


def status_skipped(reason: str) -> str:
    """The status text of a case that was not run, with its reason."""
    return f"skipped: {reason}"


def make_row(
    *,
    op: str,
    shape: Sequence[int],
    dtype: torch.dtype | str,
    provider: str,
    mode: str,
    status: str = "ok",
    timing: dict[str, float] | None = None,
    peak_bytes: int | None = None,
    bytes_moved: int | None = None,
    copy_bandwidth: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result row, with achieved GB/s and the fraction of copy bandwidth derived.

    ``bytes_moved`` is the floor of bytes an ideal implementation must read and write;
    GB/s = bytes_moved / median time (1 GB = 1e9 bytes).
    """
    row: dict[str, Any] = {
        "op": op,
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "provider": provider,
        "mode": mode,
        "status": status,
        "median_ms": None,
        "p25_ms": None,
        "p75_ms": None,
        "iqr_ms": None,
        "peak_bytes": peak_bytes,
        "bytes_moved": bytes_moved,
        "gbps": None,
        "frac_copy_bw": None,
    }
    if timing is not None:
        row.update(timing)
        row["iqr_ms"] = timing["p75_ms"] - timing["p25_ms"]
        if bytes_moved is not None and timing["median_ms"] > 0:
            bytes_per_s = bytes_moved / (timing["median_ms"] * 1e-3)
            row["gbps"] = bytes_per_s / 1e9
            if copy_bandwidth:
                row["frac_copy_bw"] = bytes_per_s / copy_bandwidth
    row.update(extra)
    return row


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    return format(value, spec)


def _table_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _roofline_fraction(row: dict[str, Any]) -> float | None:
    # Memory-bound ops: bytes moved over the copy bandwidth; GEMM-bound ones (a suite
    # that sets "frac_roofline"): the minimal FLOPs over the measured GEMM rate.
    if row.get("frac_roofline") is not None:
        return row["frac_roofline"]
    return row.get("frac_copy_bw")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of result rows (columns: ``TABLE_COLUMNS``, plus tokens/s for
    suites whose rows have it)."""
    with_tokens = any(row.get("tokens_per_s") is not None for row in rows)
    header = list(TABLE_COLUMNS)
    if with_tokens:
        header.insert(header.index("GB/s"), "tokens/s")
    lines = [_table_line(header), _table_line(["---"] * len(header))]
    for row in rows:
        op = row["op"] + (f" ({row['variant']})" if row.get("variant") else "")
        peak = row.get("peak_bytes")
        tokens = [_fmt(row.get("tokens_per_s"), ".0f")] if with_tokens else []
        lines.append(
            _table_line(
                [
                    op,
                    "x".join(str(d) for d in row["shape"]),
                    row["dtype"],
                    row["provider"],
                    row["mode"],
                    _fmt(row.get("median_ms"), ".3f"),
                    _fmt(row.get("iqr_ms"), ".3f"),
                    _fmt(None if peak is None else peak / MIB, ".1f"),
                    *tokens,
                    _fmt(row.get("gbps"), ".1f"),
                    _fmt(_roofline_fraction(row), ".2f"),
                    row["status"],
                ]
            )
        )
    return "\n".join(lines)


def _case_key(row: dict[str, Any]) -> tuple[str, str, str]:
    """What a figure panel groups: mode and variant."""
    return row["mode"], row.get("variant") or "", row["dtype"]


def plot_results(rows: Sequence[dict[str, Any]], info: dict[str, Any],
                 path: str | Path) -> Path | None:
    """A PNG per op: median time and peak memory against the shape, one line per
    provider, one row of panels per (mode, variant, dtype). None without matplotlib or
    timed rows."""
    timed = [r for r in rows if r.get("median_ms") is not None]
    if not timed:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'rlhf-fast[bench]')")
        return None
    groups = list(dict.fromkeys(_case_key(r) for r in timed))
    figure, axes = plt.subplots(len(groups), 2, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for (time_ax, memory_ax), group in zip(axes, groups):
        members = [r for r in timed if _case_key(r) == group]
        shapes = list(dict.fromkeys("x".join(map(str, r["shape"])) for r in members))
        for provider in dict.fromkeys(r["provider"] for r in members):
            mine = {"x".join(map(str, r["shape"])): r for r in members
                    if r["provider"] == provider}
            xs = [i for i, s in enumerate(shapes) if s in mine]
            time_ax.plot(xs, [mine[shapes[i]]["median_ms"] for i in xs], marker="o",
                         label=provider)
            peaks = [(i, mine[shapes[i]].get("peak_bytes")) for i in xs]
            peaks = [(i, p / MIB) for i, p in peaks if p is not None]
            if peaks:
                memory_ax.plot(*zip(*peaks), marker="o", label=provider)
        title = " ".join(part for part in group if part)
        for ax, label in ((time_ax, "median ms"), (memory_ax, "peak MiB above inputs")):
            ax.set_xticks(range(len(shapes)), shapes, rotation=20, fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{rows[0]['op']} {title}", fontsize=10)
            ax.grid(alpha=0.3)
        time_ax.set_yscale("log")
        time_ax.legend(fontsize=8)
        if not memory_ax.lines:
            memory_ax.text(0.5, 0.5, "no GPU: peak memory n/a", ha="center",
                           transform=memory_ax.transAxes)
    height = 3.2 * len(groups)
    figure.suptitle(describe_info(info), fontsize=7, wrap=True)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))  # room for the stamp
    out = Path(path)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


@dataclasses.dataclass(frozen=True)
class Headline:
    """One case (op, shape, dtype, mode, variant): rlhf-fast's best timed provider and the
    fastest timed peer (None when no peer ran)."""

    op: str
    shape: str
    dtype: str
    mode: str
    variant: str
    ours: dict[str, Any]
    peer: dict[str, Any] | None

    @property
    def name(self) -> str:
        variant = f" ({self.variant})" if self.variant else ""
        return f"{self.op}{variant} {self.shape} {self.dtype} {self.mode}"

    @property
    def speedup(self) -> float | None:
        """Peer time over ours (> 1: rlhf-fast is faster)."""
        return None if self.peer is None else self.peer["median_ms"] / self.ours["median_ms"]

    @property
    def roofline(self) -> float | None:
        return _roofline_fraction(self.ours)

    def flags(self, far_from_roofline: float = 1.5) -> list[str]:
        """Why this case needs attention: slower than a peer, far from the roofline."""
        flags = []
        if self.speedup is not None and self.speedup < 1:
            flags.append(f"SLOWER than {self.peer['provider']}")
        if self.roofline is not None and self.roofline < 1 / far_from_roofline:
            flags.append(f"further than {far_from_roofline}x from roofline")
        return flags


def headlines(rows: Sequence[dict[str, Any]]) -> list[Headline]:
    """One `Headline` per case with a timed rlhf-fast row, in the rows' order."""
    cases: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("median_ms") is not None:
            key = (row["op"], "x".join(map(str, row["shape"])), *_case_key(row))
            cases.setdefault(key, []).append(row)
    out = []
    for (op, shape, mode, variant, dtype), members in cases.items():
        ours = [r for r in members if r["provider"].startswith("rlhf_fast")]
        peers = [r for r in members if not r["provider"].startswith("rlhf_fast")]
        if ours:
            best = min(ours, key=lambda r: r["median_ms"])
            peer = min(peers, key=lambda r: r["median_ms"]) if peers else None
            out.append(Headline(op, shape, dtype, mode, variant, best, peer))
    return out


def summarize(rows: Sequence[dict[str, Any]], far_from_roofline: float = 1.5) -> list[str]:
    """One line per case (op, shape, dtype, mode, variant): rlhf-fast's best provider
    against the fastest peer, and a flag where it is slower than a peer or further than
    `far_from_roofline` x from its roofline."""
    lines = []
    for case in headlines(rows):
        text = f"{case.name}: {case.ours['provider']} {case.ours['median_ms']:.3f} ms"
        if case.peer is not None:
            text += f", {case.speedup:.2f}x vs {case.peer['provider']}"
        if case.roofline is not None:
            text += f", {case.roofline:.2f} of roofline"
        flags = case.flags(far_from_roofline)
        lines.append(text + (f"  <- {'; '.join(flags)}" if flags else ""))
    return lines


#: The README block that `readme_section` output replaces (`rlhf-fast report --readme`).
README_BEGIN = "<!-- rlhf-fast:benchmarks:begin -->"
README_END = "<!-- rlhf-fast:benchmarks:end -->"
README_COLUMNS = ("op", "case", "mode", "rlhf-fast", "ms", "fastest peer", "ms", "speedup",
                  "peak MiB (ours / peer)", "of roofline")


def _peak_mib(row: dict[str, Any] | None) -> str:
    if row is None or row.get("peak_bytes") is None:
        return "n/a"
    return f"{row['peak_bytes'] / MIB:.0f}"


def readme_section(results_dir: str | Path, link_from: str | Path) -> str:
    """The README's benchmark block from every ``<op>.json`` under `results_dir`: where
    and when they were measured, one table line per case (rlhf-fast's best provider
    against the fastest peer) and each op's plot, linked relative to `link_from` (the
    README's folder). Raises FileNotFoundError when there is no result."""
    results = Path(results_dir)
    payloads = [json.loads(path.read_text()) for path in sorted(results.glob("*.json"))]
    payloads = [p for p in payloads
                if isinstance(p, dict) and {"name", "rows", "info"} <= p.keys()]
    if not payloads:
        raise FileNotFoundError(f"no benchmark results (<op>.json) in {results}")
    stamps = list(dict.fromkeys(describe_info(p["info"]) for p in payloads))
    lines = []
    on_cpu = sum(not p["info"].get("gpu") for p in payloads)
    if on_cpu:
        which = "These" if on_cpu == len(payloads) else "Some of these"
        lines += [f"**{which} results come from the CPU fallback at tiny shapes: they "
                  "prove the harness and say nothing about GPU speed.**", ""]
    lines += [f"Measured with `rlhf-fast bench`: {stamp}." for stamp in stamps]
    lines += ["", "Per case, rlhf-fast's best provider against the fastest peer (eager, "
              "`torch.compile`, Liger-Kernel, cut-cross-entropy, TRL); every row, with IQRs, "
              "in each op's table beside its JSON.", ""]
    lines.append(_table_line(README_COLUMNS))
    lines.append(_table_line(["---"] * len(README_COLUMNS)))
    for payload in payloads:
        for case in headlines(payload["rows"]):
            peer = case.peer
            roofline = case.roofline
            lines.append(_table_line([
                case.op + (f" ({case.variant})" if case.variant else ""),
                f"{case.shape} {case.dtype}",
                case.mode,
                case.ours["provider"],
                f"{case.ours['median_ms']:.3f}",
                peer["provider"] if peer else "n/a",
                f"{peer['median_ms']:.3f}" if peer else "n/a",
                f"{case.speedup:.2f}x" if peer else "n/a",
                f"{_peak_mib(case.ours)} / {_peak_mib(peer)}",
                f"{roofline:.2f}" if roofline is not None else "n/a",
            ]))
    lines.append("")
    link_base = Path(link_from).resolve()
    for payload in payloads:
        plot = results / f"{payload['name']}.png"
        if plot.is_file():
            link = Path(os.path.relpath(plot.resolve(), link_base)).as_posix()
            lines.append(f"![{payload['name']}]({link})")
    return "\n".join(lines).rstrip() + "\n"


def replace_readme_section(readme: str | Path, section: str) -> None:
    """Put `section` between the README's benchmark markers, atomically (temp + rename)."""
    path = Path(readme)
    text = path.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(
            f"readme: {path} has no '{README_BEGIN}' ... '{README_END}' block to replace"
        )
    new = text[: begin + len(README_BEGIN)] + "\n" + section + text[end:]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def describe_info(info: dict[str, Any]) -> str:
    """One line stamping where and when the numbers were measured."""
    parts = [
        f"device: {info.get('device')}",
        f"driver: {info.get('driver')}",
        f"torch {info.get('torch')}",
        f"triton {info.get('triton')}",
        f"date: {info.get('date')}",
    ]
    bw = info.get("copy_bandwidth")
    if bw:
        note = " (CPU, meaningless as a roofline)" if not info.get("gpu") else ""
        parts.append(f"copy bandwidth: {bw / 1e9:.1f} GB/s{note}")
    if info.get("rlhf_fast_backend"):
        parts.append(f"rlhf_fast backend: {info['rlhf_fast_backend']}")
    if info.get("quick"):
        parts.append("quick shapes")
    return "; ".join(parts)


def write_results(
    rows: Sequence[dict[str, Any]],
    info: dict[str, Any],
    out_dir: str | Path,
    name: str,
) -> str:
    """Write ``<name>.json`` (info + rows), ``<name>.md`` and ``<name>.png`` (with
    matplotlib) under ``out_dir``.

    Returns the markdown text (a stamp line, notes from ``info["notes"]``, the table and
    the summary lines of `summarize`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "info": info, "rows": list(rows)}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_lines = [f"# {name} benchmark", "", describe_info(info), ""]
    for note in info.get("notes", []):
        md_lines.append(f"- {note}")
    if info.get("notes"):
        md_lines.append("")
    md_lines.append(format_table(rows))
    summary = summarize(rows)
    if summary:
        md_lines += ["", "Summary (rlhf-fast's best provider per case):", ""]
        md_lines += [f"- {line}" for line in summary]
    if plot_results(rows, info, out / f"{name}.png") is not None:
        md_lines += ["", f"![{name}]({name}.png)"]
    markdown = "\n".join(md_lines) + "\n"
    (out / f"{name}.md").write_text(markdown)
    return markdown


def gate_and_time(
    *,
    benchmark: Any,
    device: torch.device,
    row_args: dict[str, Any],
    group: str,
    provider: Callable[[], Any],
    gate: Callable[[Any], tuple[bool, dict[str, float]]],
    prepare: Callable[[Any], tuple[Callable[..., Any], Callable[[], Any] | None]],
    columns: Callable[[dict[str, float]], dict[str, Any]],
    time_kwargs: dict[str, Any] | None = None,
    few_rounds: bool = False,
) -> tuple[dict[str, Any], str | None]:
    """The life of one benchmark case, shared by every suite: gate, then time, then a row.

    ``group`` is the pytest-benchmark group (the case without its provider).
    ``provider()`` builds the provider's function ``fn`` (a peer may fail to, e.g. an
    import). ``gate(fn)`` runs it once against the reference and returns (ok, rel errors);
    a provider that fails it is reported "wrong" and not timed (a pytest failure for
    rlhf-fast, an xfail for a peer); a peer that raises, or any OOM, is a skipped row.
    ``prepare(fn)`` returns the timed call and its untimed per-call setup (or None).
    ``columns(timing)`` gives the row's roofline columns (``bytes_moved`` and
    ``copy_bandwidth``, or a suite's own, which also go to pytest-benchmark's extra_info).
    ``few_rounds`` keeps pytest-benchmark to CPU-sized round counts for slow providers.

    Returns the row and the pytest outcome to raise (or None). The caller keeps the
    inputs in its own frame, so they are freed before it raises that outcome.
    """
    ours = row_args["provider"].startswith("rlhf_fast")
    try:
        fn = provider()
        ok, errors = gate(fn)
    except torch.cuda.OutOfMemoryError:
        return make_row(status=status_skipped("out of GPU memory"), **row_args), "skip"
    except Exception as exc:  # a peer that cannot run here (e.g. compile failing)
        if ours:
            raise
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        return make_row(status=status_skipped(reason), **row_args), "skip"
    if not ok:
        row = make_row(status=status_wrong(max(errors.values())), rel_err=errors, **row_args)
        return row, "fail" if ours else "xfail"

    timed, setup = prepare(fn)
    short = few_rounds or torch.device(device).type != "cuda"
    try:
        timing = time_fn(timed, device=device, setup=setup, **(time_kwargs or {}))
        peak = peak_memory_above(timed, device, setup=setup)
        pedantic_setup = None
        if setup is not None:

            def pedantic_setup() -> tuple[tuple[Any], dict[str, Any]]:
                state = setup()
                _sync(device)
                return (state,), {}

        benchmark.group = group
        benchmark.pedantic(
            synced(timed, device),
            setup=pedantic_setup,
            rounds=3 if short else 10,
            iterations=1,
            warmup_rounds=1 if short else 2,
        )
    except torch.cuda.OutOfMemoryError:
        status = status_skipped("out of GPU memory")
        return make_row(status=status, rel_err=errors, **row_args), "skip"

    extra = columns(timing)
    row = make_row(timing=timing, peak_bytes=peak, rel_err=errors, **extra, **row_args)
    record_extra_info(benchmark, row)
    for key in extra:
        if key in row:  # copy_bandwidth is consumed by make_row, not a row column
            benchmark.extra_info[key] = row[key]
    return row, None


class Runs(enum.Enum):
    """Where a peer's code runs besides CUDA; the value is how a skipped row says it."""

    #: Triton kernels that do not work in the interpreter (cut-cross-entropy's).
    CUDA = "CUDA"
    #: Triton kernels that also run in the interpreter, so CI gates their adapters there.
    CUDA_OR_INTERPRETER = "CUDA (or TRITON_INTERPRET=1)"
    #: PyTorch code, or a package that picks its own torch ops off CUDA (TRL's kernels
    #: run on CUDA and XPU only, and TRL falls back to PyTorch elsewhere).
    ANY_DEVICE = "any device"


#: Optional peers: provider name -> (package, where its code runs). On the CPU a
#: ``CUDA_OR_INTERPRETER`` peer runs only under TRITON_INTERPRET=1, a ``CUDA`` one never.
PEERS = {
    "liger": ("liger_kernel", Runs.CUDA_OR_INTERPRETER),
    "cce": ("cut_cross_entropy", Runs.CUDA),
    "trl": ("trl", Runs.ANY_DEVICE),
}


@functools.cache
def _import_attr(module: str, name: str) -> tuple[Any, str | None]:
    package = module.split(".")[0]
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as exc:  # installed but broken: a missing dependency, a torch mismatch
        if isinstance(exc, ModuleNotFoundError) and exc.name == package:
            return None, f"{package} not installed"
        return None, f"{package} failed to import: {type(exc).__name__}: {exc}"[:120]


def peer_entry(
    provider: str, module: str, name: str, device: torch.device, *, runs: Runs | None = None
) -> tuple[Any, str | None]:
    """(``module.name`` of the peer `provider`, None), or (None, why it cannot run on
    `device`). Imported lazily: only the cases that run a peer pay for its import.
    ``runs``: where this entry runs when that is not where its package's does (``PEERS``),
    e.g. Liger-Kernel's chunked losses, PyTorch code in a package of Triton kernels."""
    package, package_runs = PEERS[provider]
    runs = package_runs if runs is None else runs
    entry, reason = _import_attr(module, name)
    if reason is not None:
        return None, reason
    if torch.device(device).type == "cuda" or runs is Runs.ANY_DEVICE:
        return entry, None
    if runs is Runs.CUDA_OR_INTERPRETER and os.environ.get("TRITON_INTERPRET") == "1":
        return entry, None
    return None, f"{package} runs on {runs.value} only"


def require_peer(
    provider: str, module: str, name: str, device: torch.device, *, runs: Runs | None = None
) -> Any:
    """`peer_entry`'s entry, or a RuntimeError saying why the peer cannot run (raised
    inside `gate_and_time`'s ``provider()``, it makes the case a skipped row)."""
    entry, reason = peer_entry(provider, module, name, device, runs=runs)
    if reason is not None:
        raise RuntimeError(reason)
    return entry


@functools.cache
def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False)``, built once per function, on first use (the
    suites skip their compile provider on the CPU). Dynamo keeps a bounded number of
    graphs per code object (8) and falls back to eager past it, silently: a suite whose
    shapes x (grad, no grad) would pass that compiles a separate function per mode."""
    return torch.compile(fn, dynamic=False)


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
