"""`DPOConfig`: everything a DPO run of `rlhf_fast.trainers.dpo.DPOTrainer` (or of its
other objectives: SimPO, CPO, ORPO, KTO) needs besides the models and the data, with TRL
DPOConfig's names as aliases."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from rlhf_fast.options import (
    CPO_OPTIONS,
    DPO_OPTIONS,
    DPO_TOKEN_OPTIONS,
    KTO_OPTIONS,
    ORPO_OPTIONS,
    SIMPO_OPTIONS,
    OptionSet,
)
from rlhf_fast.trainers.config import (
    TRAINER_TRL_NAMES,
    FieldChecker,
    TrainerConfig,
    TrlNames,
    is_finite,
)
from rlhf_fast.types import DPO_MIX_TYPES, DPO_REFERENCE_FREE_TYPES, DPO_SFT

#: The trainer's objectives beside dpo_loss's types, each with its op's option set
OBJECTIVES: dict[str, OptionSet] = {"simpo": SIMPO_OPTIONS, "cpo": CPO_OPTIONS,
                                    "orpo": ORPO_OPTIONS, "kto": KTO_OPTIONS}
LOSS_TYPES = DPO_MIX_TYPES + tuple(OBJECTIVES)
REFERENCE_FREE_OBJECTIVES = ("simpo", "cpo", "orpo")
#: The objectives that read each option field ("dpo": dpo_loss's types and their mixes);
#: the others require its default
READ_BY = {
    "gamma": ("simpo",), "alpha": ("cpo",), "cpo_loss_type": ("cpo",),
    "desirable_weight": ("kto",), "undesirable_weight": ("kto",),
    "label_smoothing": ("dpo", "simpo", "cpo"),  # (dpo_loss's rule: which of its types)
    **{name: ("dpo",) for name in DPO_OPTIONS.names + DPO_TOKEN_OPTIONS.names
       if name not in ("beta", "loss_type", "label_smoothing", "reduction")},
}


#: dpo_loss's loss_type option, which the trainer's loss_type field widens
LOSS_TYPE = next(o for o in DPO_OPTIONS.options if o.name == "loss_type")


def record_kind(loss_type: str | list[str]) -> str:
    """The kind of records `loss_type` trains on (`rlhf_fast.trainers.sources`): kto's
    unpaired records {prompt, completion, label}, or preference "pairs"."""
    return "kto" if loss_type in ("kto", ["kto"]) else "pairs"


def objective(loss_type: str | tuple[str, ...]) -> str:
    """The trainer's objective of a (checked) loss_type: simpo, cpo, orpo, kto, or "dpo"
    for dpo_loss's types and their mixes."""
    return loss_type if isinstance(loss_type, str) and loss_type in OBJECTIVES else "dpo"


#: TRL DPOConfig's names of DPOConfig fields that are spelled otherwise here (beta,
#: loss_type, max_length, label_smoothing, ... are spelled alike)
TRL_NAMES: TrlNames = TRAINER_TRL_NAMES | {
    "per_device_train_batch_size": ("batch_size", None),
    "per_device_eval_batch_size": ("eval_batch_size", None),
    "num_train_epochs": ("num_epochs", None),
    "precompute_ref_log_probs": ("precompute_ref_logps", None),
}


@dataclass
@KTO_OPTIONS.fields(exclude=("beta", "reduction"), after="loss_type")
@CPO_OPTIONS.fields(exclude=("beta", "label_smoothing", "reduction"), after="loss_type",
                    rename={"loss_type": "cpo_loss_type"})
@SIMPO_OPTIONS.fields(exclude=("beta", "label_smoothing", "reduction"), after="loss_type")
@DPO_TOKEN_OPTIONS.fields(after="loss_type")
@DPO_OPTIONS.fields(exclude=("reduction", "loss_type"), after="loss_type")
class DPOConfig(TrainerConfig):
    """Everything a DPO run needs besides the models and the data: the fields of
    `TrainerConfig`, then DPO's own, among them the options of `dpo_loss` (but reduction:
    the mean over the batch) declared in `rlhf_fast.options`.

    Sizes are per process: under torchrun the global batch is
    batch_size * gradient_accumulation_steps * world size.
    """

    trl_names: ClassVar[TrlNames] = TRL_NAMES  # TRL's names of fields: `from_trl_names`

    output_dir: str = "runs/dpo"
    """Where metrics.jsonl, the plot, checkpoints and the final model go."""
    lr: float = 5e-7
    """Peak AdamW learning rate."""
    logging_steps: int = 10
    """Log the mean of the metrics every this many optimizer steps."""
    loss_type: str | list[str] = dataclasses.field(default=LOSS_TYPE.default, metadata={
        "doc": (f"{LOSS_TYPE.doc}, or another objective on the same batches: simpo, cpo, "
                "orpo (reference-free: simpo_loss, cpo_loss, orpo_loss on the pairs; gamma, "
                "alpha, cpo_loss_type) or kto (kto_loss on unpaired records {prompt, "
                "completion, label}; desirable_weight, undesirable_weight) (one of "
                f"{LOSS_TYPES}; a list: dpo_loss's types)")})
    reference_free: bool = False
    """Use no reference model (log pi_ref = 0); only for DPO_REFERENCE_FREE_TYPES."""
    precompute_ref_logps: bool = False
    """Score every record under the reference once before training, then free it."""
    batch_size: int = 8
    """Preference pairs per process per micro-batch (the forward sees 2x sequences)."""
    eval_batch_size: int = 16
    """Pairs per evaluation batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    num_epochs: float = 1.0
    """Passes over the training set, when max_steps is 0 (each epoch drops its last
    incomplete global batch)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means num_epochs passes."""
    max_length: int = 512
    """Longest prompt + answer in tokens; answers are cut to fit."""
    eval_split: str | None = None
    """Score this split of train_dataset's source (a DatasetDict, a dataset folder or a hub
    id) as the eval set when there is no eval_dataset; the split of a several-split
    eval_dataset (default "test")."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require = FieldChecker("DPOConfig")
        if isinstance(self.loss_type, (list, tuple)) and len(self.loss_type) == 1:
            self.loss_type = self.loss_type[0]  # (the CLI's --loss-type X)
        require("loss_type", self.loss_type in LOSS_TYPES if isinstance(self.loss_type, str)
                else isinstance(self.loss_type, (list, tuple)),
                f"one of {LOSS_TYPES} or a list of {DPO_MIX_TYPES}")
        self._check_options()
        require.bools(self, ("reference_free", "precompute_ref_logps"))
        kinds = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        require("reference_free", not self.reference_free or all(
            k in DPO_REFERENCE_FREE_TYPES + (DPO_SFT,) + tuple(OBJECTIVES) for k in kinds),
                f"False for loss_type {self.loss_type!r} (allowed for "
                f"{DPO_REFERENCE_FREE_TYPES}, sft and {tuple(OBJECTIVES)})")
        require("precompute_ref_logps", not (
            self.precompute_ref_logps
            and objective(self.loss_type) in REFERENCE_FREE_OBJECTIVES),
                f"False for loss_type {self.loss_type!r} (it reads no reference)")
        # there is no reference to score: the flag would be silently ignored
        require("precompute_ref_logps", not (self.reference_free and self.precompute_ref_logps),
                "False with reference_free=True (there is no reference to score)")
        require.ints(self, ("batch_size", "eval_batch_size", "gradient_accumulation_steps",
                            "max_length"), 1)
        require.ints(self, ("max_steps",), 0)
        require("max_prompt_length", self.max_prompt_length < self.max_length,
                f"< max_length ({self.max_length}), leaving room for the answer")
        require("num_epochs", is_finite(self.num_epochs) and self.num_epochs > 0,
                "a finite float > 0", self.num_epochs)
        sorted_kinds = [k for k in kinds if k in ("aot", "aot_unpaired")]
        require("use_weighting", not (self.use_weighting and sorted_kinds),
                f"False for loss_type {self.loss_type!r} (aot's losses are of sorted "
                "positions, not pairs; TRL refuses it too)")

    def _check_options(self) -> None:
        """The loss's options through its op's option set (errors naming the field), and
        every option another loss type reads at its default: never silently ignored."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        kind = objective(self.loss_type)
        for name, readers in READ_BY.items():
            if kind not in readers and getattr(self, name) != defaults[name]:
                raise ValueError(f"DPOConfig.{name} is read only by loss_type in {readers} "
                                 f"(dpo: dpo_loss's types); leave it at {defaults[name]!r} for "
                                 f"{self.loss_type!r}, got {getattr(self, name)!r}")
        option_sets = [DPO_OPTIONS, DPO_TOKEN_OPTIONS] if kind == "dpo" else [OBJECTIVES[kind]]
        for options in option_sets:
            options.check_fields(self)
