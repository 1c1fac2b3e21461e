"""The ``rlhf-fast train dpo|ppo`` command (its parser is `rlhf_fast.cli`'s): everything
that can be checked before a model loads (--model and --data given, --device, the
output_dir's checkpoints, --data and one global batch of it, the model flags' paths or hub
ids, --reward-fn), the models and tokenizer loaded as --dtype, --attn-implementation and
--trust-remote-code say, the trainer's run, and where its outputs are.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_fast.config_flags import config_from_args


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


def train_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`train dpo|ppo`: check the flags, load the data, models and tokenizer, run the
    trainer; returns the exit code."""
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
    from rlhf_fast.trainers.dpo_config import record_kind
    from rlhf_fast.trainers.sources import load_source

    def read(flag: str, source: str, kind: str, split: str) -> Any:
        try:
            return load_source(source, kind, "records" if kind != "prompts" else "prompts",
                               split)
        except (OSError, ValueError) as exc:
            parser.error(f"{flag} {source}: {exc}")

    if args.algorithm == "ppo":
        return read("--data", args.data, "prompts", config.data_split), None
    kind = record_kind(config.loss_type)
    eval_data = None
    if args.eval_data:
        eval_data = read("--eval-data", args.eval_data, kind, config.eval_split or "test")
    elif config.eval_split is not None:
        eval_data = read("--data", args.data, kind, config.eval_split)
    return read("--data", args.data, kind, config.data_split), eval_data
