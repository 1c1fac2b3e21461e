"""The ``rlhf-fast`` command line.

Subcommands:
    demo [--out DIR] [--quick]
        The whole pipeline on a toy task with a tiny model, on any machine, in under a minute
        (`rlhf_fast.demo`).
    train dpo|ppo --model PATH_OR_ID --data SOURCE [--config FILE] [--<config field> VALUE ...]
        The reference trainers on a real model: every field of DPOConfig / PPOConfig is
        a flag in both spellings (``--max-steps 100`` or ``--max_steps 100``,
        ``--use-fused-linear`` / ``--no-use-fused-linear``), TRL's names too
        (``--learning_rate``); --config reads the same from a YAML or JSON file.
        Its flags are checked, and its models loaded and trained, by `rlhf_fast.cli_train`.
    bench [op ...] [--quick] [--headline] [--out DIR] [--readme FILE] [-k EXPR]
        Run the benchmark suites shipped in ``rlhf_fast.benchmarks`` (the repository's
        ``benchmarks/`` folder, installed under that name) through pytest and
        pytest-benchmark, and write ``<op>.json`` / ``<op>.md`` under DIR (and, with
        --readme, FILE's benchmark block from them, as ``report`` does).
    report [--results DIR] [--readme FILE]
        The README's benchmark block from the results under DIR: printed, or written
        between the block's markers in FILE.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_fast.cli_train import train_command
from rlhf_fast.config_flags import BoolFlag, add_config_flags, apply_config_file, spellings

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


def pytest_args(files: Sequence[Path], directory: Path, out: str, quick: bool,
                select: str | None = None, headline: bool = False) -> list[str]:
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
        # one timing per case, the harness's (time_fn: do_bench on CUDA); pytest-benchmark
        # would time every case again, and its table disagree with the results
        "--benchmark-disable",
        f"--rootdir={directory}",
        f"--confcutdir={directory}",
        "--bench-out",
        out,
    ]
    if quick:
        args.append("--quick")
    if headline:
        args.append("--headline")
    if select:
        args += ["-k", select]
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
    files = [ops[op] for op in selected]
    code = int(pytest.main(pytest_args(files, directory, out, args.quick, args.select,
                                       args.headline)))
    if args.readme is None:
        return code
    if code != 0:  # a case failed its gate or crashed: the block would hide it
        print(f"not updating {args.readme}: the benchmark run failed (exit code {code})")
        return code
    return _write_readme_block(out, args.readme, parser)


def _write_readme_block(results: str, readme: str | None,
                        parser: argparse.ArgumentParser) -> int:
    """The README's benchmark block from the results under `results`: printed, or
    written between the block's markers in `readme`."""
    try:  # the results' reader only: neither pytest nor the suites
        from rlhf_fast.benchmarks import report
    except ImportError as exc:
        parser.error(f"{exc.name} is needed to report: pip install 'rlhf-fast[bench]'")
    path = Path(readme) if readme else None
    try:
        link_from = path.parent if path is not None else Path.cwd()
        section = report.readme_section(results, link_from)
        if path is None:
            print(section, end="")
        else:
            report.replace_readme_section(path, section)
            print(f"updated the benchmark block of {path} from {results}")
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    return 0


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return _write_readme_block(args.results, args.readme, parser)


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rlhf_fast.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device)
    return 0


#: --dtype's values: the weights' dtype from_pretrained loads ("auto": the checkpoint's)
DTYPES = ("float32", "bfloat16", "float16", "auto")


def _add_train_parser(commands: Any) -> None:
    from rlhf_fast.trainers import DPOConfig, PPOConfig

    train = commands.add_parser("train", help="train a model with DPO or PPO / GRPO",
                                description="Train a local or hub causal LM with the "
                                            "reference DPO or PPO / GRPO trainer.")
    algorithms = train.add_subparsers(dest="algorithm", metavar="ALGORITHM", required=True)
    for name, config_class, data_help in (
        ("dpo", DPOConfig, "preference records {prompt, chosen, rejected} or {chosen, "
                           "rejected} (--loss-type kto: {prompt, completion, label}), "
                           "strings or chat messages: a JSONL / JSON / parquet file, a "
                           "dataset folder or a hub dataset id"),
        ("ppo", PPOConfig, "prompts: a JSONL / JSON / parquet file of {prompt} records "
                           "(strings or chat messages), a text file of one per line, a "
                           "dataset folder or a hub dataset id"),
    ):
        sub = algorithms.add_parser(name, help=f"{name.upper()} training")
        add_run_flags(sub, name, data_help)
        add_config_flags(sub, config_class)
        # (the subparser itself: --config sets its defaults, then the line is parsed again)
        sub.set_defaults(handler=train_command, command_parser=sub)


def add_run_flags(sub: argparse.ArgumentParser, algorithm: str, data_help: str) -> None:
    """The flags of `train <algorithm>` besides the config's fields: the models, the
    data, how models load, rewards, --config. Both spellings of each, and TRL's
    (--model_name_or_path)."""
    sub.add_argument("--config", metavar="FILE",
                     help="a YAML (.yaml, .yml) or JSON file of flag or field names (either "
                          "spelling, TRL's names too) and values; flags given on the command "
                          "line override them")
    sub.add_argument(*spellings("model"), *spellings("model_name_or_path"), dest="model",
                     metavar="PATH_OR_ID",
                     help="the policy: a local folder or a hub id (AutoModelForCausalLM); "
                          "required")
    sub.add_argument("--data", metavar="SOURCE", help=f"{data_help}; required")
    sub.add_argument(*spellings("tokenizer"), metavar="PATH_OR_ID", help="default: --model")
    sub.add_argument(*spellings("ref_model"), metavar="PATH_OR_ID",
                     help="the frozen reference (default: a copy of --model)")
    sub.add_argument(*spellings("dtype"), *spellings("torch_dtype"), dest="dtype",
                     choices=DTYPES, default="float32",
                     help="the dtype every model's weights load in (from_pretrained's "
                          "dtype; auto: the checkpoint's) (default: float32)")
    sub.add_argument(*spellings("attn_implementation"), metavar="NAME",
                     help="from_pretrained's attn_implementation for every model, e.g. "
                          "eager, sdpa, flash_attention_2 (default: the model's own)")
    sub.add_argument(*spellings("trust_remote_code"), dest="trust_remote_code",
                     action=BoolFlag, default=False,
                     help="run the modelling code a hub model ships (default: False)")
    if algorithm == "dpo":
        sub.add_argument(*spellings("eval_data"), metavar="SOURCE",
                         help="held-out preference records (or --eval-split of --data)")
        return
    sub.add_argument(*spellings("reward_model"), metavar="PATH_OR_ID", nargs="+",
                     help="one or more sequence classifiers with one label, scored at the "
                          "answer's last token")
    sub.add_argument(*spellings("reward_fn"), *spellings("reward_funcs"), dest="reward_fn",
                     metavar="MODULE:FUNCTION", nargs="+",
                     help="one or more f(prompts, answers) -> scores, on the decoded text: "
                          "module:function (the current folder is searched too) or "
                          "path/to/file.py:function (with --reward-model: after the "
                          "models, in --reward-weights' order)")
    sub.add_argument(*spellings("teacher_model"), metavar="PATH_OR_ID",
                     help="on-policy distillation: a causal LM with the policy's vocabulary "
                          "whose per-token log-prob of each sampled token minus the "
                          "policy's is a reward (--distill-coef); with it the reward flags "
                          "are optional")
    sub.add_argument(*spellings("value_model"), metavar="PATH_OR_ID",
                     help="critic init: a sequence classifier with one label, or a critic "
                          "this trainer saved (<output_dir>/value_model, a checkpoint's "
                          "value_model/) (default: a copy of the policy's backbone, zero "
                          "head)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rlhf-fast``."""
    parser = argparse.ArgumentParser(
        prog="rlhf-fast",
        description="Fused Triton kernels for RLHF training: tools.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="warm-up, DPO and PPO of a tiny model on a toy task (any machine, under a minute)",
        description="Build a tokenizer and a tiny Llama from the shipped text, then train "
                    "it with DPO on shipped preference pairs and with PPO on a toy reward. "
                    "Writes metrics, plots and models under --out.",
    )
    demo.add_argument("--out", default="runs/demo", metavar="DIR",
                      help="output folder (default: runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a few steps of each stage only")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--device", default="cpu",
                      help="cpu (default) or cuda: the trainers on the GPU's fused kernels")
    demo.set_defaults(handler=_demo)
    _add_train_parser(commands)
    bench = commands.add_parser(
        "bench",
        help="benchmark the ops against eager PyTorch, torch.compile, Liger-Kernel, "
             "cut-cross-entropy and TRL (those three when installed)",
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
    bench.add_argument(
        "--headline", action="store_true",
        help="the short GPU run: each suite's headline size in its fwd+bwd mode (every "
             "provider checked against the float64 reference first, then timed), no "
             "compiled providers",
    )
    bench.add_argument(
        "--readme", metavar="FILE",
        help="after a run that passed, write the benchmark block of this README from "
             "the results (as `rlhf-fast report --results DIR --readme FILE` does)",
    )
    bench.add_argument(
        "-k", dest="select", metavar="EXPR",
        help="only the cases whose id matches this pytest -k expression, e.g. "
             "'rlhf_fast and fwd+bwd' (ids: shape-dtype-mode-provider)",
    )
    bench.set_defaults(handler=_bench)
    report = commands.add_parser(
        "report",
        help="the README's benchmark table and plots from benchmark results",
        description=(
            "Summarise the results of `rlhf-fast bench` (one line per case: rlhf-fast's "
            "best provider against the fastest peer) with links to their plots; print it, "
            "or replace the block between the benchmark markers of a README."
        ),
    )
    report.add_argument(
        "--results", default=DEFAULT_BENCH_OUT, metavar="DIR",
        help=f"directory of the <op>.json results (default: {DEFAULT_BENCH_OUT})",
    )
    report.add_argument("--readme", metavar="FILE",
                        help="README to update in place (default: print the block)")
    report.set_defaults(handler=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rlhf-fast`` console script; returns the exit code."""
    args, parser = parse_command_line(argv)
    return args.handler(args, parser)


def parse_command_line(argv: Sequence[str] | None = None
                       ) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """The parsed command line (a --config file's values under the flags given) and the
    parser of its command, whose usage errors name it (``rlhf-fast train dpo: ...``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):  # the file's values as defaults, then flags over them
        apply_config_file(args.command_parser, args.config)
        args = parser.parse_args(argv)
    return args, getattr(args, "command_parser", parser)


if __name__ == "__main__":
    raise SystemExit(main())
