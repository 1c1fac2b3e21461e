"""Trainer configs: the fields every trainer has (`TrainerConfig`, which `PPOConfig` and
`DPOConfig` extend with their own) and the checks that name a bad field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PRECISIONS = ("auto", "bf16", "fp32")


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


@dataclass
class TrainerConfig:
    """What every trainer's run needs: where it writes, the optimizer, precision and model
    options, seeding, and the cadence of logs and checkpoints.

    A trainer's config extends it, redeclaring a field only to give it the trainer's own
    default (output_dir, lr, logging_steps). Each field's docstring is its --help text.
    """

    output_dir: str = "runs"
    """Where metrics.jsonl, the plot, checkpoints and the final model go."""
    lr: float = 1e-6
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up of the learning rate over this many optimizer steps."""
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
    disable_dropout: bool = True
    """Zero the trained models' dropout (as TRL does), so the policy and the frozen
    reference agree before the first step; False keeps the models' own rates."""
    seed: int = 0
    """Seeds the data order and, as seed + the process's rank, every random stream
    (PPO's sampling included)."""
    logging_steps: int = 10
    """Log the mean of the metrics every this many steps."""
    save_steps: int = 0
    """Write checkpoint-<step>.pt every this many steps (0: only at the end)."""
    save_total_limit: int = 0
    """Keep at most this many checkpoint-<step>.pt in output_dir: after each new one is
    written, the oldest others are deleted (0 keeps them all)."""
    resume_from: str | None = None
    """A checkpoint file, or "latest" (the newest in output_dir that can be read), to
    continue from."""
    device: str | None = None
    """"cuda", "cpu", ...; None picks the GPU when there is one."""
    data_split: str = "train"
    """The split to train on when the data has several: a DatasetDict, a dataset folder or
    a hub dataset id (a file or a list is one split)."""

    def __post_init__(self) -> None:
        """The shared fields' checks; a trainer's config runs them, then its own."""
        require = FieldChecker(type(self).__name__)
        require("lr", is_finite(self.lr) and self.lr > 0, "a finite float > 0", self.lr)
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            require(name, is_finite(value) and value >= 0, "a finite float >= 0", value)
        require.ints(self, ("max_prompt_length", "logging_steps"), 1)
        require.ints(self, ("warmup_steps", "save_steps", "save_total_limit", "seed"), 0)
        require.bools(self, ("gradient_checkpointing", "disable_dropout"))
        require.bools(self, ("use_fused_linear",), optional=True)
        require("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}")
        require("data_split", isinstance(self.data_split, str) and self.data_split != "",
                "a split name", self.data_split)
        require("resume_from", self.resume_from is None or self.resume_from != "",
                'a checkpoint file, "latest" or None', self.resume_from)
