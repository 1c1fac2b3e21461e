"""Benchmark results: the rows, their markdown tables and plots, the summary against the
fastest peer, and the README's benchmark block (`rlhf-fast report`).

A row is one case's result (`make_row`): what was measured (op, shape, dtype, provider,
mode, variant), its status ("ok", "wrong (...)", "skipped: ..."), its timing and memory
and its roofline columns. `write_results` writes a suite's rows as ``<op>.json``,
``<op>.md`` and ``<op>.png``; `readme_section` reads every ``<op>.json`` back.

This module imports neither pytest nor the suites: `rlhf-fast report` runs without them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

MIB = 1024**2

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


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: the `header`'s cells, then each row's (formatted with ``str``)."""
    lines = [_table_line(header), _table_line(["---"] * len(header))]
    lines += [_table_line([str(cell) for cell in row]) for row in rows]
    return "\n".join(lines)


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
    cells = []
    for row in rows:
        op = row["op"] + (f" ({row['variant']})" if row.get("variant") else "")
        peak = row.get("peak_bytes")
        tokens = [_fmt(row.get("tokens_per_s"), ".0f")] if with_tokens else []
        cells.append([
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
        ])
    return markdown_table(header, cells)


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
    # no memory panels where no row measured its peak (the CPU fallback): none empty
    with_memory = any(r.get("peak_bytes") is not None for r in timed)
    figure, axes = plt.subplots(len(groups), 2 if with_memory else 1,
                                figsize=(11 if with_memory else 6, 3.2 * len(groups)),
                                squeeze=False)
    for panels, group in zip(axes, groups):
        time_ax, memory_ax = panels[0], panels[1] if with_memory else None
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
            if peaks and memory_ax is not None:
                memory_ax.plot(*zip(*peaks), marker="o", label=provider)
        title = " ".join(part for part in group if part)
        for ax, label in ((time_ax, "median ms"), (memory_ax, "peak MiB above inputs")):
            if ax is None:
                continue
            ax.set_xticks(range(len(shapes)), shapes, rotation=20, fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{rows[0]['op']} {title}", fontsize=10)
            ax.grid(alpha=0.3)
        time_ax.set_yscale("log")
        time_ax.legend(fontsize=8)
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


def summarize(rows: Sequence[dict[str, Any]], far_from_roofline: float = 1.5, *,
              verdicts: bool = True) -> list[str]:
    """One line per case (op, shape, dtype, mode, variant): rlhf-fast's best provider
    against the fastest peer, and a flag where it is slower than a peer or further than
    `far_from_roofline` x from its roofline. Without `verdicts` (timings of the CPU
    fallback at tiny shapes, which prove the harness and nothing about speed) no flag and
    no roofline fraction."""
    lines = []
    for case in headlines(rows):
        text = f"{case.name}: {case.ours['provider']} {case.ours['median_ms']:.3f} ms"
        if case.peer is not None:
            text += f", {case.speedup:.2f}x vs {case.peer['provider']}"
        if case.roofline is not None and verdicts:
            text += f", {case.roofline:.2f} of roofline"
        flags = case.flags(far_from_roofline) if verdicts else []
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
    summary = summarize(rows, verdicts=bool(info.get("gpu")))
    if summary:
        heading = "Summary (rlhf-fast's best provider per case)"
        if not info.get("gpu"):
            heading += "; CPU fallback: these timings prove the harness, not speed"
        md_lines += ["", heading + ":", ""]
        md_lines += [f"- {line}" for line in summary]
    if plot_results(rows, info, out / f"{name}.png") is not None:
        md_lines += ["", f"![{name}]({name}.png)"]
    markdown = "\n".join(md_lines) + "\n"
    (out / f"{name}.md").write_text(markdown)
    return markdown

