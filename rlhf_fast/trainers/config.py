"""Trainer configs: the fields every trainer has (`TrainerConfig`, which `PPOConfig` and
`DPOConfig` extend with their own) and the checks that name a bad field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlhf_fast.trainers.trackers import REPORT_TO, missing_tracker_packages, package_available

PRECISIONS = ("auto", "bf16", "fp32")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")
#: transformers' SchedulerType values that `transformers.get_scheduler` builds from the
#: warm-up and the run's optimizer steps alone (reduce_lr_on_plateau and greedy need a
#: metric, the *_min_lr and warmup_stable_decay ones extra arguments).
LR_SCHEDULER_TYPES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                      "constant_with_warmup", "inverse_sqrt")

#: A config's TRL names: name -> (field, None) for a plain rename of the field,
#: (field, {TRL value: the fields it sets}) where TRL's value means settings of ours, or
#: (field, bool or a converter of the flag's text) for a value that the config's own
#: from_trl_names translates.
TrlNames = dict[str, tuple[str, dict[Any, dict[str, Any]] | Callable[[Any], Any] | None]]
#: transformers TrainingArguments' names of TrainerConfig fields (every TRL config has them)
TRAINER_TRL_NAMES: TrlNames = {
    "learning_rate": ("lr", None),
    "resume_from_checkpoint": ("resume_from", None),
}


_UNSET = object()


class FieldChecker:
    """``check(field, ok, expected[, value])`` raises ValueError "<Owner>.<field> must be
    <expected>" (", got <value>" when given)."""

    def __init__(self, owner: str):
        self.owner = owner

    def __call__(self, field: str, ok: bool, expected: str, value: Any = _UNSET) -> None:
        if not ok:
            got = "" if value is _UNSET else f", got {value!r}"
            raise ValueError(f"{self.owner}.{field} must be {expected}{got}")

    def ints(self, config: Any, names: tuple[str, ...], minimum: int) -> None:
        """Each field an int >= minimum (counts of steps: 2.5 steps is a typo, not a plan)."""
        for name in names:
            value = getattr(config, name)
            self(name, is_int(value) and value >= minimum, f"an int >= {minimum}", value)

    def bools(self, config: Any, names: tuple[str, ...], optional: bool = False) -> None:
        """Each field True or False (or None when optional): "no" would read as True."""
        for name in names:
            value = getattr(config, name)
            ok = isinstance(value, bool) or (optional and value is None)
            self(name, ok, "True, False or None" if optional else "True or False", value)


def is_int(value: Any) -> bool:
    """An int and not a bool (True would pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A finite real number (not a bool, NaN or an infinity)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


class AcceptsTrlNames(type):
    """Metaclass of the configs: their constructor takes TRL's names of fields too
    (``DPOConfig(learning_rate=1e-6, per_device_train_batch_size=4)``), translated by
    the class's `from_trl_names`, so one table (`trl_names`) serves the constructor, the
    flags and the config files alike."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        fields = {f.name for f in dataclasses.fields(cls)}
        trl = {k: kwargs.pop(k) for k in list(kwargs)
               if k in cls.trl_names and k not in fields}
        if trl:
            translated = cls.from_trl_names(**trl)
            twice = sorted(set(translated) & set(kwargs))
            if twice:  # which one wins would be a guess
                raise ValueError(f"{cls.__name__}: {twice} given both by name and by TRL's "
                                 f"name ({sorted(trl)}); give each once")
            kwargs |= translated
        return super().__call__(*args, **kwargs)


@dataclass
class TrainerConfig(metaclass=AcceptsTrlNames):
    """What every trainer's run needs: where it writes, the optimizer, precision and model
    options, seeding, and the cadence of logs and checkpoints.

    A trainer's config extends it, redeclaring a field only to give it the trainer's own
    default (output_dir, lr, logging_steps). Each field's docstring is its --help text.
    TRL's names of fields (`trl_names`) are accepted by the constructor, the CLI and
    config files alike (`from_trl_names`).
    """

    trl_names: ClassVar[TrlNames] = TRAINER_TRL_NAMES

    output_dir: str = "runs"
    """Where metrics.jsonl, the plot, checkpoints and the final model go."""
    overwrite_output_dir: bool = False
    """Delete the checkpoints an earlier run left in output_dir when a fresh run starts
    (without it such a run is refused: resume_from="latest" would pick them up later)."""
    lr: float = 1e-6
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler_type: str = "linear"
    """The learning-rate schedule over the run's optimizer steps, transformers'
    `get_scheduler` names (as TRL): one of linear, cosine, cosine_with_restarts,
    polynomial, constant, constant_with_warmup, inverse_sqrt."""
    warmup_steps: int = 0
    """Linear warm-up of the learning rate from 0 over this many optimizer steps."""
    warmup_ratio: float = 0.0
    """Warm-up over this share of the run's optimizer steps (when warmup_steps is 0)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip over all trained parameters together (PPO: policy and critic;
    0 disables)."""
    max_prompt_length: int = 256
    """Longest prompt in tokens; longer prompts keep their last tokens."""
    precision: str = "auto"
    """"bf16" (autocast), "fp32", or "auto": bf16 on a GPU that has it, else fp32."""
    use_fused_linear: bool | None = None
    """Log-probs from hidden states (linear_logprobs) instead of logits; None: on a GPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward to save memory."""
    torch_compile: bool = False
    """torch.compile each micro-batch's step: the models' forwards and the loss (the
    rlhf_fast ops are custom ops, traced without a graph break); the first steps, and
    each new batch shape, are slow (compiling)."""
    torch_compile_backend: str = "inductor"
    """torch.compile's backend (transformers' name): "inductor", "aot_eager", ..."""
    torch_compile_mode: str | None = None
    """torch.compile's mode: None, "default", "reduce-overhead" (CUDA graphs),
    "max-autotune", "max-autotune-no-cudagraphs"."""
    disable_dropout: bool = True
    """Zero the trained models' dropout (as TRL does), so the policy and the frozen
    reference agree before the first step; False keeps the models' own rates."""
    use_peft: bool = False
    """Train a LoRA adapter (peft) instead of the whole model (TRL's ModelConfig names);
    the reference is then the same model with its adapter disabled."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA path (disable_dropout zeroes it too)."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt ("all-linear": every linear layer); None: peft's default for
    the architecture."""
    seed: int = 0
    """Seeds the data order and, as seed + the process's rank, every random stream
    (PPO's sampling included)."""
    logging_steps: int = 10
    """Log the mean of the metrics every this many steps."""
    eval_steps: int = 0
    """Evaluate every this many steps (0: only at the end) when there is an eval set
    (DPO: eval_dataset; PPO: eval_prompts)."""
    save_steps: int = 0
    """Write a checkpoint-<step> folder every this many steps (0: only at the end)."""
    save_total_limit: int = 0
    """Keep at most this many checkpoint-<step> folders in output_dir: after each new one is
    written, the oldest others are deleted (0 keeps them all)."""
    resume_from: str | None = None
    """A checkpoint folder, or "latest" (the newest in output_dir that can be read), to
    continue from."""
    device: str | None = None
    """"cuda", "cpu", ...; None picks the GPU when there is one."""
    data_split: str = "train"
    """The split to train on when the data has several: a DatasetDict, a dataset folder or
    a hub dataset id (a file or a list is one split)."""
    report_to: str | list[str] = "none"
    """Trackers that also get each logged row (metrics.jsonl is always written), TRL's
    names: "tensorboard" (<output_dir>/runs), "wandb", "trackio", or "none"; a list for
    several."""

    @property
    def trackers(self) -> list[str]:
        """report_to as a list of trackers ("none" dropped)."""
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        return [name for name in names if name != "none"]

    def compiled(self, step: Callable[..., Any]) -> Callable[..., Any]:
        """`step` under torch.compile (dynamic shapes: one graph for every batch size
        and length) when torch_compile is set, else `step` itself."""
        if not self.torch_compile:
            return step
        return torch.compile(step, dynamic=True, backend=self.torch_compile_backend,
                             mode=self.torch_compile_mode)

    def num_warmup_steps(self, training_steps: int) -> int:
        """The warm-up's optimizer steps: warmup_steps, else warmup_ratio of the run's."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * training_steps)

    def __post_init__(self) -> None:
        """The shared fields' checks; a trainer's config runs them, then its own."""
        require = FieldChecker(type(self).__name__)
        require("lr", is_finite(self.lr) and self.lr > 0, "a finite float > 0", self.lr)
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            require(name, is_finite(value) and value >= 0, "a finite float >= 0", value)
        require.ints(self, ("max_prompt_length", "logging_steps"), 1)
        require.ints(self, ("warmup_steps", "eval_steps", "save_steps", "save_total_limit",
                            "seed"), 0)
        require.bools(self, ("gradient_checkpointing", "disable_dropout", "use_peft",
                             "overwrite_output_dir", "torch_compile"))
        require("torch_compile_backend", isinstance(self.torch_compile_backend, str)
                and self.torch_compile_backend in torch._dynamo.list_backends(exclude_tags=()),
                f"one of {torch._dynamo.list_backends(exclude_tags=())}",
                self.torch_compile_backend)
        require("torch_compile_mode", self.torch_compile_mode in COMPILE_MODES,
                f"one of {COMPILE_MODES}", self.torch_compile_mode)
        require.ints(self, ("lora_r", "lora_alpha"), 1)
        require("lora_dropout", is_finite(self.lora_dropout) and 0 <= self.lora_dropout < 1,
                "a float in [0, 1)", self.lora_dropout)
        require("lora_target_modules", self.lora_target_modules is None
                or isinstance(self.lora_target_modules, str)
                or (isinstance(self.lora_target_modules, (list, tuple))
                    and all(isinstance(m, str) for m in self.lora_target_modules)),
                'None, "all-linear" or a list of module names', self.lora_target_modules)
        require("use_peft", not self.use_peft or package_available("peft"),
                "False without the 'peft' package (pip install peft)", self.use_peft)
        require.bools(self, ("use_fused_linear",), optional=True)
        require("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}")
        require("lr_scheduler_type", self.lr_scheduler_type in LR_SCHEDULER_TYPES,
                f"one of {LR_SCHEDULER_TYPES}", self.lr_scheduler_type)
        require("warmup_ratio", is_finite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
                "a float in [0, 1)", self.warmup_ratio)
        require("warmup_ratio", not (self.warmup_ratio and self.warmup_steps),
                "0 when warmup_steps is set (one warm-up length)", self.warmup_ratio)
        self._check_report_to(require)
        require("data_split", isinstance(self.data_split, str) and self.data_split != "",
                "a split name", self.data_split)
        require("resume_from", self.resume_from is None or self.resume_from != "",
                'a checkpoint file, "latest" or None', self.resume_from)

    def _check_report_to(self, require: FieldChecker) -> None:
        """report_to as a list of known trackers whose packages are installed."""

        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        require("report_to", isinstance(names, (list, tuple))
                and all(name in REPORT_TO for name in names),
                f"one of {REPORT_TO} or a list of them", self.report_to)
        for tracker, package in missing_tracker_packages(self.trackers):
            require("report_to", False, f"a tracker whose package is installed: "
                    f"{tracker!r} needs the {package!r} package (pip install {package})")

    @classmethod
    def from_trl_names(cls, **given: Any) -> dict[str, Any]:
        """The config's fields from TRL's names of them (`trl_names`): a plain rename
        gives its value to the field; a name whose values mean settings of ours (PPO's
        loss_type) gives the fields its value sets. Unknown names or values raise
        ValueError naming them."""
        unknown = sorted(set(given) - set(cls.trl_names))
        if unknown:
            raise ValueError(f"unknown TRL names {unknown}; known: {sorted(cls.trl_names)}")
        fields: dict[str, Any] = {}
        for name, value in given.items():
            field, meaning = cls.trl_names[name]
            if meaning is None:
                fields[field] = value
            elif value not in meaning:
                raise ValueError(f"{name} must be one of {tuple(meaning)}, got {value!r}")
            else:
                fields |= meaning[value]
        return fields
