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
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhf_fast.config_flags import (
    BoolFlag,
    add_config_flags,
    apply_config_file,
    config_from_args,
    spellings,
)

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


def model_kwargs(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """from_pretrained's keyword arguments from --dtype, --attn-implementation and
    --trust-remote-code (float32, the model's default attention, no remote code when
    absent); the same for every model a run loads."""
    import torch
    import transformers
    from packaging.version import Version

    dtype = getattr(args, "dtype", "float32")
    # transformers 4.56 renamed torch_dtype to dtype
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs: dict[str, Any] = {key: dtype if dtype == "auto" else getattr(torch, dtype),
                              "trust_remote_code": bool(getattr(args, "trust_remote_code",
                                                                False))}
    if getattr(args, "attn_implementation", None):
        kwargs["attn_implementation"] = args.attn_implementation
    return kwargs


def load_causal_lm(name_or_path: str, args: argparse.Namespace | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs(args))


def load_tokenizer(name_or_path: str, args: argparse.Namespace | None = None) -> Any:
    """The model's tokenizer; pad falls back to EOS, as most causal LMs have none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path, trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_sequence_scorer(name_or_path: str, args: argparse.Namespace | None = None) -> Any:
    from transformers import AutoModelForSequenceClassification

    from rlhf_fast.trainers.models import ValueModel, is_saved_value_model

    if is_saved_value_model(name_or_path):  # a critic the PPO trainer saved: value_model/
        return ValueModel.from_pretrained(name_or_path, **model_kwargs(args))
    return AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1,
                                                              **model_kwargs(args))


def import_function(spec: str, flag: str = "--reward-fn") -> Callable[..., Any]:
    """``package.module:function`` (importable from the current folder too, as with
    ``python -m``) or ``path/to/file.py:function`` -> the function; ValueError naming
    `flag` when the module, file or function is missing."""
    module_name, _, attribute = spec.rpartition(":")  # rpartition: C:\\x.py:f on Windows
    if not module_name or not attribute:
        raise ValueError(f"{flag} must look like package.module:function or "
                         f"path/to/file.py:function, got {spec!r}")
    if module_name.endswith(".py") or looks_like_a_path(module_name) or "/" in module_name:
        module = import_file(module_name, spec, flag)
    else:
        module = import_module_from_cwd(module_name, spec, flag)
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"{flag} {spec}: {module_name} has no function {attribute!r}")
    return function


def import_module_from_cwd(module_name: str, spec: str, flag: str) -> Any:
    """`module_name`, found on sys.path or in the current folder: a console script's
    sys.path lacks the folder it runs in, where a user's rewards.py usually is."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # first, as `python -m` puts it
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise ValueError(f"{flag} {spec}: no module named {exc.name!r} (looked on "
                             f"sys.path and in the current folder {cwd})") from None
        raise  # a module the user's module imports is missing: its own traceback says


def import_file(path: str, spec: str, flag: str) -> Any:
    """The module of the Python file at `path`, registered under its file's stem."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{flag} {spec}: no such file {file}")
    loader_spec = importlib.util.spec_from_file_location(file.stem, file)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"{flag} {spec}: {file} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules.setdefault(file.stem, module)  # (pickling its functions finds them)
    loader_spec.loader.exec_module(module)
    return module


def available_devices() -> list[str]:
    """The devices this torch can run on: cpu, each cuda:i, mps."""
    import torch

    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str | None, parser: argparse.ArgumentParser) -> None:
    """--device names a device this machine and torch build have (a CPU-only torch has no
    cuda), checked before any model loads."""
    import torch

    if device is None:
        return
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError):
        parser.error(f"--device {device}: not a device name; available: "
                     f"{', '.join(available_devices())}")
    available = available_devices()
    if target.type == "cuda":
        count = torch.cuda.device_count()
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA GPU is visible" if count == 0 else None)
        if why is None and target.index is not None and target.index >= count:
            why = f"there {'is' if count == 1 else 'are'} {count} CUDA GPU(s)"
        if why is not None:
            parser.error(f"--device {device}: {why}; available: {', '.join(available)}")
    elif target.type == "mps" and "mps" not in available:
        parser.error(f"--device {device}: MPS is not available; available: "
                     f"{', '.join(available)}")


def check_output_dir(config: Any, parser: argparse.ArgumentParser) -> None:
    """A fresh run's output_dir must hold no checkpoints, and a resumed run needs the one
    it names (the trainers check both too, but only once the models are loaded: minutes,
    for a large one)."""
    from rlhf_fast.trainers.checkpoints import check_no_checkpoints, resolve_checkpoint

    if config.resume_from is None:
        if config.overwrite_output_dir:
            return  # the trainer deletes them when it starts
        try:
            check_no_checkpoints(config.output_dir)
        except ValueError as exc:
            parser.error(f"{exc} (or pass --overwrite-output-dir to delete them)")
        return
    try:
        resolve_checkpoint(config.resume_from, config.output_dir)
    except FileNotFoundError as exc:
        parser.error(f"--resume-from {config.resume_from}: {exc}")


def check_batch_fits(args: argparse.Namespace, config: Any, records: int,
                     parser: argparse.ArgumentParser) -> None:
    """--data must hold one global batch (as the trainers require, once the models are
    loaded); sizes are per process, and torchrun starts WORLD_SIZE of them."""
    flag, size = (("--batch-size", config.batch_size) if args.algorithm == "dpo"
                  else ("--rollout-batch-size", config.rollout_batch_size))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if records < size * world:
        processes = f" x {world} processes" if world > 1 else ""
        parser.error(f"{flag} {size}{processes} is more than the {records} records of "
                     f"--data {args.data}; expected at most {records // world}")


# the flags that name a model, tokenizer or reward model: a local path or a hub id
MODEL_FLAGS = ("--model", "--tokenizer", "--ref-model", "--reward-model", "--value-model",
               "--teacher-model")


def looks_like_a_path(value: str) -> bool:
    """Written as a filesystem path (./x, ../x, /x, ~/x, or with this OS's separator
    where that is not "/"), hence never a hub id."""
    separators = {os.sep, os.altsep} - {None, "/"}
    return (value in (".", "..") or value.startswith(("./", "../", "/", "~"))
            or any(sep in value for sep in separators))


def is_hub_id(value: str) -> bool:
    """A well-formed Hugging Face repo id ("name" or "namespace/name")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def check_model_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Each model flag names an existing file or folder (~ expanded), or else a hub id.
    A missing local folder would otherwise fail only after the other models load, with
    Hugging Face's "Repo id must ...", which misreads it as a hub id."""
    for flag in MODEL_FLAGS:
        dest = flag.removeprefix("--").replace("-", "_")
        value = getattr(args, dest, None)
        if value is None:
            continue
        checked = [checked_model(flag, v, parser) for v in
                   (value if isinstance(value, list) else [value])]
        setattr(args, dest, checked if isinstance(value, list) else checked[0])


def checked_model(flag: str, value: str, parser: argparse.ArgumentParser) -> str:
    """`value` of a model flag: an existing path (~ expanded) or a hub id."""
    path = Path(value).expanduser()
    if path.exists():
        return str(path)
    if looks_like_a_path(value) or not is_hub_id(value):
        parser.error(f"{flag} {value}: no such file or folder (and not a hub id: "
                     "'name' or 'namespace/name')")
    return value


def check_required(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--model and --data, given as flags or by --config (so argparse cannot require
    them itself)."""
    missing = [flag for flag in ("--model", "--data")
               if getattr(args, flag[2:]) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} "
                     "(as flags or keys of --config)")


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rlhf_fast.trainers import DPOConfig, DPOTrainer, PPOConfig, PPOTrainer

    check_required(args, parser)
    config = config_from_args(DPOConfig if args.algorithm == "dpo" else PPOConfig, args, parser)
    # everything that can be checked before loading models (minutes, for large ones)
    check_device(config.device, parser)
    check_output_dir(config, parser)
    data, eval_data = read_data(args, config, parser)
    check_batch_fits(args, config, len(data), parser)
    check_model_flags(args, parser)
    if args.algorithm == "ppo" and not (args.reward_model or args.reward_fn
                                        or args.teacher_model):
        parser.error("train ppo needs --reward-model or --reward-fn (or several), or "
                     "--teacher-model")
    try:
        functions = [import_function(f) for f in getattr(args, "reward_fn", None) or []]
    except ValueError as exc:
        parser.error(str(exc))
    tokenizer = load_tokenizer(args.tokenizer or args.model, args)
    ref_model = load_causal_lm(args.ref_model, args) if args.ref_model else None
    if args.algorithm == "dpo":
        trainer = DPOTrainer(
            load_causal_lm(args.model, args), ref_model,
            tokenizer=tokenizer, train_dataset=data, eval_dataset=eval_data, config=config,
        )
    else:
        # the reward models, then the functions: config.reward_weights' order
        rewards = [load_sequence_scorer(m, args) for m in args.reward_model or []] + functions
        reward = None if not rewards else rewards[0] if len(rewards) == 1 else rewards
        trainer = PPOTrainer(
            load_causal_lm(args.model, args), ref_model,
            load_sequence_scorer(args.value_model, args) if args.value_model else None,
            reward, tokenizer=tokenizer, prompts=data, config=config,
            teacher=load_causal_lm(args.teacher_model, args) if args.teacher_model else None,
        )
    trainer.train()
    if trainer.run.is_main:
        print(describe_outputs(config.output_dir))
    return 0


def describe_outputs(output_dir: str | Path) -> str:
    """Where a finished run's outputs are: the final model folder(s), metrics.jsonl, the
    plot(s) and the checkpoints (those that exist)."""
    from rlhf_fast.trainers.checkpoints import checkpoints_by_step

    output = Path(output_dir)
    lines = [f"outputs in {output}:"]
    for final in sorted(p for p in output.glob("final*") if p.is_dir()):
        lines.append(f"  model:       {final}")
    if (output / "metrics.jsonl").exists():
        lines.append(f"  metrics:     {output / 'metrics.jsonl'}")
    for plot in sorted(output.glob("*.png")):
        lines.append(f"  plot:        {plot}")
    checkpoints = checkpoints_by_step(output)
    if checkpoints:
        lines.append(f"  checkpoints: {len(checkpoints)} in {output} (newest: "
                     f"{checkpoints[-1].name})")
    return "\n".join(lines)


def read_data(args: argparse.Namespace, config: Any, parser: argparse.ArgumentParser
              ) -> tuple[Any, Any]:
    """The datasets of --data (and --eval-data, or --eval-split of --data), loaded and
    checked before any model is; a usage error naming the flag. The trainers get these
    `datasets.Dataset`s, so a file's tokenised columns are cached by `datasets`."""
    from rlhf_fast.trainers.data import load_source

    def read(flag: str, source: str, kind: str, split: str) -> Any:
        try:
            return load_source(source, kind, "records" if kind != "prompts" else "prompts",
                               split)
        except (OSError, ValueError) as exc:
            parser.error(f"{flag} {source}: {exc}")

    if args.algorithm == "ppo":
        return read("--data", args.data, "prompts", config.data_split), None
    kind = "kto" if config.loss_type in ("kto", ["kto"]) else "pairs"
    eval_data = None
    if args.eval_data:
        eval_data = read("--eval-data", args.eval_data, kind, config.eval_split or "test")
    elif config.eval_split is not None:
        eval_data = read("--data", args.data, kind, config.eval_split)
    return read("--data", args.data, kind, config.data_split), eval_data


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
        sub.set_defaults(handler=_train, command_parser=sub)


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
