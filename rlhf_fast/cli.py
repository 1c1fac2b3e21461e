"""The ``rlhf-fast`` command line.

Subcommands:
    bench [op ...] [--quick] [--out DIR]
        Run the benchmark suites shipped in ``rlhf_fast.benchmarks`` (the repository's
        ``benchmarks/`` folder, installed under that name) through pytest and
        pytest-benchmark, and write ``<op>.json`` / ``<op>.md`` under DIR.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path

BENCH_PACKAGE = "rlhf_fast.benchmarks"
DEFAULT_BENCH_OUT = "benchmarks/results"


def bench_dir() -> Path:
    """The folder of the installed ``rlhf_fast.benchmarks`` package (works from any cwd)."""
    module = importlib.import_module(BENCH_PACKAGE)
    if module.__file__ is None:
        raise RuntimeError(f"{BENCH_PACKAGE} has no __file__; is rlhf-fast installed?")
    return Path(module.__file__).resolve().parent


def known_ops(directory: Path | None = None) -> dict[str, Path]:
    """Benchmarked op names mapped to their suite files, from ``bench_<op>.py``."""
    directory = bench_dir() if directory is None else directory
    return {path.stem.removeprefix("bench_"): path for path in sorted(directory.glob("bench_*.py"))}


def pytest_args(files: Sequence[Path], directory: Path, out: str, quick: bool) -> list[str]:
    """The pytest command line that runs the suites `files` of `directory`.

    ``--rootdir`` and ``--confcutdir`` pin conftest discovery to the benchmark folder,
    so its ``conftest.py`` (options, result writer) is used and no other is, from an
    installed location or a clone alike.
    """
    args = [str(f) for f in files]
    args += [
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-disable-gc",
        "--benchmark-columns=min,median,iqr,max,rounds",
        f"--rootdir={directory}",
        f"--confcutdir={directory}",
        "--bench-out",
        out,
    ]
    if quick:
        args.append("--quick")
    return args


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    directory = bench_dir()
    ops = known_ops(directory)
    unknown = [op for op in args.ops if op not in ops]
    if unknown:
        parser.error(
            f"unknown op(s): {', '.join(unknown)}; known ops: {', '.join(ops) or '(none)'}"
        )
    selected = list(dict.fromkeys(args.ops)) or list(ops)
    try:
        import pytest
        import pytest_benchmark  # noqa: F401 - the suites need its fixture
    except ImportError as exc:
        parser.error(f"{exc.name} is needed to benchmark: pip install 'rlhf-fast[bench]'")
    out = str(Path(args.out).resolve())
    return int(pytest.main(pytest_args([ops[op] for op in selected], directory, out, args.quick)))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rlhf-fast``."""
    parser = argparse.ArgumentParser(
        prog="rlhf-fast",
        description="Fused Triton kernels for RLHF training: tools.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = commands.add_parser(
        "bench",
        help="benchmark the ops against eager PyTorch and torch.compile",
        description=(
            "Run the benchmark suites and write <op>.json and <op>.md. Without a CUDA GPU "
            "the suites run at tiny shapes on the CPU fallback (this proves the harness, "
            "not speed)."
        ),
    )
    bench.add_argument("ops", nargs="*", metavar="op", help="ops to benchmark (default: all)")
    bench.add_argument(
        "--quick", action="store_true", help="tiny shapes (forced when no CUDA GPU is present)"
    )
    bench.add_argument(
        "--out",
        default=DEFAULT_BENCH_OUT,
        metavar="DIR",
        help=f"directory for the results (default: {DEFAULT_BENCH_OUT})",
    )
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rlhf-fast`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args, parser)


if __name__ == "__main__":
    raise SystemExit(main())
