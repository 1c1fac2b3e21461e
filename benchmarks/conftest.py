"""pytest plumbing for the benchmark suites: options, the result collector, the writer.

Options:
    --quick          tiny shapes that run in seconds on the CPU (forced without a CUDA GPU)
    --bench-out DIR  where ``<op>.json`` / ``<op>.md`` are written (default: ``results/``
                     next to this file)

Each suite declares its cases (``SUITE``, a `cases.Suite`) and appends their rows
(`report.make_row`) to the session-scoped ``bench_session`` fixture; at the end of the
session one JSON + markdown pair is written per op and the tables are printed.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf_fast.benchmarks import report, timing

NO_GPU_NOTE = (
    "No CUDA GPU: these numbers come from the CPU fallback at tiny shapes and say nothing "
    "about GPU speed."
)

_SESSION_KEY = pytest.StashKey["BenchSession"]()


def _rlhf_fast_backend(device: torch.device) -> str:
    """Which implementation `rlhf_fast` ops run on `device` (see rlhf_fast.ops.dispatch)."""
    from rlhf_fast.ops.dispatch import use_triton

    try:
        triton = use_triton(torch.empty(0, device=device))
    except ValueError as exc:
        return f"misconfigured ({exc})"
    if not triton:
        return "torch reference (CPU fallback)"
    return "triton" if device.type == "cuda" else "triton interpreter (TRITON_INTERPRET=1)"


class BenchSession:
    """Per-session state shared by all suites: device, mode, copy bandwidth, rows."""

    def __init__(self, config: pytest.Config) -> None:
        self.gpu = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.gpu else "cpu")
        self.quick = bool(config.getoption("--quick")) or not self.gpu
        out = config.getoption("--bench-out")
        self.out_dir = Path(out) if out else Path(__file__).parent / "results"
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self._copy_bandwidth: float | None = None
        self._info: dict[str, Any] | None = None

    @property
    def copy_bandwidth(self) -> float:
        """Measured copy bandwidth (bytes/s), once per session, before any suite allocates."""
        if self._copy_bandwidth is None:
            self._copy_bandwidth = timing.measure_copy_bandwidth(self.device)
        return self._copy_bandwidth

    def info(self) -> dict[str, Any]:
        """Device stamp plus how the numbers were taken."""
        if self._info is None:
            info = report.device_info()
            info["rlhf_fast_backend"] = _rlhf_fast_backend(self.device)
            info["quick"] = self.quick
            info["copy_bandwidth"] = self.copy_bandwidth
            notes = []
            if not self.gpu:
                notes.append(NO_GPU_NOTE)
            notes += [
                "median and IQR over calls: triton.testing.do_bench on CUDA (L2 flushed "
                "before each call); time.perf_counter on the CPU.",
                "bwd (where a suite has it) is timed directly: the forward that builds "
                "the graph runs untimed before each timed backward call.",
                "peak MiB above inputs: torch.cuda.max_memory_allocated during the call "
                "minus what was allocated before it (for bwd: inputs and the saved graph); "
                "n/a on the CPU.",
                "GB/s: the bytes an ideal implementation must move (each suite's module "
                "docstring gives its byte count) over the median time. Fraction of "
                "roofline: that over the measured copy bandwidth, or for GEMM-bound ops "
                "(the suites from hidden states: linear_logprobs, linear_ppo_loss, "
                "linear_dpo_loss, linear_token_divergence, simpo_loss, cpo_loss, "
                "orpo_loss, kto_loss) the minimal FLOPs over the measured bf16 GEMM rate "
                "(e2e: the model FLOPs, i.e. model FLOPs utilisation).",
            ]
            info["notes"] = notes
            self._info = info
        return self._info

    def add(self, row: dict[str, Any]) -> None:
        """Record one result row under its op name."""
        self.rows.setdefault(row["op"], []).append(row)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each suite's ``case`` parameter: its ``SUITE.cases(quick)``, ids from ``Case.id``.
    Quick shapes with --quick, and always without a CUDA GPU."""
    suite = getattr(metafunc.module, "SUITE", None)
    if "case" in metafunc.fixturenames and suite is not None:
        quick = bool(metafunc.config.getoption("--quick")) or not torch.cuda.is_available()
        if metafunc.config.getoption("--headline"):
            all_cases = suite.headline_cases(quick)
        else:
            all_cases = suite.cases(quick)
        metafunc.parametrize("case", all_cases, ids=[c.id for c in all_cases])


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rlhf-fast bench")
    group.addoption(
        "--quick",
        action="store_true",
        default=False,
        help="tiny shapes (forced when no CUDA GPU is present)",
    )
    group.addoption(
        "--headline",
        action="store_true",
        default=False,
        help="each suite's headline size, its fwd+bwd mode, no compiled providers",
    )
    group.addoption(
        "--bench-out",
        default=None,
        metavar="DIR",
        help="directory for <op>.json and <op>.md (default: benchmarks/results)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SESSION_KEY] = BenchSession(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    session = config.stash[_SESSION_KEY]
    lines = [f"rlhf-fast bench: device {session.device}, quick={session.quick}"]
    if not session.gpu:
        lines.append(NO_GPU_NOTE)
    return lines


@pytest.fixture(scope="session")
def bench_session(request: pytest.FixtureRequest) -> BenchSession:
    """The session's result collector (rows are written out at the end of the session)."""
    session = request.config.stash[_SESSION_KEY]
    session.copy_bandwidth  # noqa: B018 - measured before the first case allocates
    return session


@pytest.fixture(autouse=True)
def _free_memory() -> Iterator[None]:
    """Release each case's tensors before the next one: the GPU cases are gigabytes."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    session = config.stash.get(_SESSION_KEY, None)
    if session is None or not session.rows:
        return
    info = session.info()
    for op, rows in session.rows.items():
        markdown = report.write_results(rows, info, session.out_dir, op)
        terminalreporter.write_sep("=", f"rlhf-fast bench: {op}")
        terminalreporter.write_line(markdown)
        out = os.path.join(session.out_dir, op)
        written = [f"{out}.json", f"{out}.md"] + ([f"{out}.png"]
                                                  if os.path.exists(f"{out}.png") else [])
        terminalreporter.write_line(f"written: {', '.join(written)}")
    terminalreporter.write_line(
        f"README table and plots from these results: rlhf-fast report --results "
        f"{session.out_dir} --readme README.md"
    )
    if not session.gpu:
        terminalreporter.write_line(NO_GPU_NOTE)
