"""What the PPO and DPO trainers share: the model-side log-prob forward, the run's device,
precision and processes, metric logging, and atomic checkpoints.

The trainers themselves (`dpo.py`, `ppo.py`) keep the algorithm; this module keeps the
plumbing out of their way.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
from torch import nn

from rlhf_fast.ops.linear_logprobs import linear_logprobs
from rlhf_fast.ops.logprobs import logprobs

PRECISIONS = ("auto", "bf16", "fp32")


# --- the model side: per-token log-probs and values ---------------------------------


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens, as `generate` numbers them.

    Without it, a left-padded row's first real token would sit at position P (its pad
    count) in the training forward but at 0 during generation, and the two log-probs of
    the same rollout would disagree.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body of a transformers model (everything before its head)."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None:
            return decoder
    return model.base_model


# Config attributes by which models transform ``hidden @ lm_head.weight.T`` before the
# softmax, which linear_logprobs does not reproduce. Soft caps, tanh(x / c) * c, are not
# the identity for any c (Gemma 2/3, RecurrentGemma) ...
LOGIT_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap")
# ... and scales are, at 1: Cohere's logit_scale and Falcon-H1's lm_head_multiplier
# multiply, Granite's logits_scaling divides (HyperCLOVA X's multiplies), MuseGlimmer's
# output_multiplier multiplies.
LOGIT_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def model_configs(model: nn.Module) -> list[Any]:
    """The model's config and, when it nests one (multimodal models), its text decoder's
    config, where the logit transforms of the language model are set."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        text_config = get_text_config(decoder=True)
        if text_config is not None and text_config is not config:
            configs.append(text_config)
    return configs


def logit_transform(model: nn.Module) -> tuple[str, Any] | None:
    """The first (attribute, value) of the model's configs that transforms its logits,
    or None when the logits are plain ``hidden @ lm_head.weight.T (+ bias)``."""
    for config in model_configs(model):
        for attribute in LOGIT_SOFTCAPS + LOGIT_SCALES:
            value = getattr(config, attribute, None)
            if value is None or (attribute in LOGIT_SCALES and value == 1.0):
                continue
            return attribute, value
    return None


def check_fused_linear_supported(model: nn.Module) -> None:
    """Raise when the model's logits are not ``hidden @ lm_head.weight.T (+ bias)``."""
    transform = logit_transform(model)
    if transform is not None:
        attribute, value = transform
        raise ValueError(
            f"use_fused_linear: this model transforms its logits ({attribute}={value}), "
            "which linear_logprobs does not; set use_fused_linear=False"
        )
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        raise ValueError("use_fused_linear needs an nn.Linear lm_head; set use_fused_linear=False")
    if is_fsdp2_sharded(model):
        # the fused path calls the backbone and reads lm_head.weight outside the root
        # module's forward, where FSDP2 keeps the root's parameters sharded
        raise ValueError("use_fused_linear does not support FSDP2-sharded models yet; set "
                         "use_fused_linear=False")


class TokenLogprobs(nn.Module):
    """A causal LM whose forward returns the log-prob (and entropy) of each next token.

    Wrapping the model (rather than calling pieces of it from the trainer) lets
    DistributedDataParallel wrap this module, so its hooks see the whole forward.

    forward(input_ids [B, L], attention_mask [B, L]) -> logp [B, L-1] fp32 (and entropy
    [B, L-1] fp32): logp[:, t] = log p(input_ids[:, t+1] | input_ids[:, :t+1]) at
    `temperature`. With `fused_linear`, `rlhf_fast.linear_logprobs` on the last hidden
    state and the lm_head weight (the logits never exist); else `rlhf_fast.logprobs` on
    the model's logits.
    """

    def __init__(self, model: nn.Module, *, fused_linear: bool, temperature: float = 1.0):
        super().__init__()
        if fused_linear:
            check_fused_linear_supported(model)
        self.model = model
        self.fused_linear = fused_linear
        self.temperature = temperature

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_entropy: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        position_ids = position_ids_from(attention_mask)
        labels = input_ids[:, 1:]
        options = dict(temperature=self.temperature, return_entropy=return_entropy)
        if not self.fused_linear:
            logits = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False,
            ).logits
            return logprobs(logits[:, :-1], labels, **options)
        hidden = backbone_of(self.model)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state[:, :-1]
        head = self.model.get_output_embeddings()
        if not torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(head.weight.dtype)  # as the lm_head would cast it
        # under autocast, linear_logprobs runs its GEMMs in autocast's dtype, as the
        # lm_head would, and returns fp32 master weights an fp32 gradient
        return linear_logprobs(hidden, head.weight, labels, bias=head.bias, **options)


class ValueModel(nn.Module):
    """A critic: a causal LM backbone with a scalar head on every position.

    forward(input_ids [B, L], attention_mask [B, L]) -> values [B, L] fp32, the value of
    the state ending at each position. Build one from a policy (`from_causal_lm`: a copy of
    its backbone, a zero-initialised head so the first values are 0) or from a path or
    hub id (`from_pretrained`).
    """

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, model: nn.Module) -> ValueModel:
        import copy

        backbone = copy.deepcopy(backbone_of(model))
        backbone.requires_grad_(True)
        return cls(backbone, model.config.hidden_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> ValueModel:
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(name_or_path, **kwargs)
        return cls(backbone, backbone.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids_from(attention_mask), use_cache=False,
        ).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()


class SequenceClassifierValues(nn.Module):
    """Per-position scores of an ``AutoModelForSequenceClassification`` with one label.

    Its backbone and ``score`` head applied at every position (the model's own forward
    pools at the last non-pad token, which misfires when pad and EOS share an id).
    forward(input_ids [B, L], attention_mask [B, L]) -> [B, L] fp32.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        head = getattr(model, "score", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ValueError(
                "expected a sequence-classification model with a one-output nn.Linear "
                f"`score` head (num_labels=1), got {type(model).__name__}"
            )
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids_from(attention_mask), use_cache=False,
        ).last_hidden_state
        head = self.model.score
        return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def as_value_module(model: nn.Module) -> nn.Module:
    """A module giving per-position scalars [B, L]: ValueModel as is, or a classifier."""
    return model if isinstance(model, ValueModel) else SequenceClassifierValues(model)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing (the name changed in transformers 5)."""
    target = model.backbone if isinstance(model, ValueModel) else model
    enable = getattr(target, "activation_checkpointing_enable", None)
    (enable or target.gradient_checkpointing_enable)()


DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                   nn.FeatureAlphaDropout)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability of `model`: its dropout modules, and the
    ``attention_dropout`` rate that transformers' attention layers (Llama, Qwen, ...)
    read at each call. A trained policy then scores a batch as the frozen reference
    does (DPO's rewards start at exactly 0; PPO's ratios at exactly 1), as TRL does by
    default."""
    for module in model.modules():
        if isinstance(module, DROPOUT_MODULES):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode with no parameter requiring a gradient."""
    return model.eval().requires_grad_(False)


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


# --- the run: processes, device, precision, seeds ----------------------------------------


@dataclass
class Run:
    """Where this process trains: its rank among `world` processes and its device."""

    rank: int
    world: int
    device: torch.device
    precision: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def fused_linear(self, requested: bool | None) -> bool:
        """A config's use_fused_linear: None means on when training on a GPU."""
        return self.device.type == "cuda" if requested is None else requested

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for precision "bf16", nothing for "fp32"."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Average each metric over the processes (a no-op for one)."""
        if self.world == 1 or not values:
            return values
        stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(stacked)
        return dict(zip(values, (stacked / self.world).tolist()))

    def sum_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total.item())

    def peak_memory(self) -> dict[str, float]:
        """{"peak_memory_gb": the most GPU memory any process held since the last call}
        on CUDA (then the peak starts afresh), {} elsewhere."""
        if self.device.type != "cuda":
            return {}
        peak = torch.tensor([torch.cuda.max_memory_allocated(self.device) / 2**30],
                            dtype=torch.float64, device=self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        if self.world > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return {"peak_memory_gb": float(peak.item())}


def setup_run(precision: str, device: str | None = None) -> Run:
    """Join the torchrun process group when there is one, and pick device and precision.

    Under torchrun (WORLD_SIZE > 1) each process takes the GPU of its LOCAL_RANK (NCCL),
    or the CPU (gloo). precision "auto" is bf16 autocast on a GPU that supports it, fp32
    elsewhere.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    if precision == "auto":
        gpu_bf16 = target.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if gpu_bf16 else "fp32"
    return Run(rank=rank, world=world, device=target, precision=precision)


def host_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar metric tensors as floats, in one device-to-host copy (one sync, not one
    per metric)."""
    values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()])
    return dict(zip(metrics, values.tolist()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def seed_process(seed: int, run: Run) -> None:
    """Seed this process's random streams with ``seed + rank``.

    With one seed for all, every process would draw the same sampling noise (and dropout
    masks). Nothing that must agree across processes reads these streams: DDP broadcasts
    rank 0's weights when it wraps the model, and the data order comes from generators
    seeded by `seed` alone (`example_indices`).
    """
    seed_everything(seed + run.rank)


def rng_state() -> dict[str, Any]:
    """Every random stream a training step draws from, to restore on resume."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(run: Run) -> list[dict[str, Any]] | None:
    """Every process's `rng_state`, as a list indexed by rank on the main process (None
    on the others). A collective with several processes: every process must call it."""
    state = rng_state()
    if run.world == 1:
        return [state]
    gathered: list[Any] | None = [None] * run.world if run.is_main else None
    dist.gather_object(state, gathered, dst=0)
    return gathered


def restore_rng_states(saved: dict[str, Any] | list[dict[str, Any]], run: Run) -> None:
    """Restore this process's streams from a checkpoint's "rng": a list indexed by rank
    (`gather_rng_states`) or one state (checkpoints written before that: rank 0's).

    A process with no saved state (the run resumes on more processes than wrote the
    checkpoint) keeps the streams `seed_process` gave it, distinct from the others'.
    """
    states = saved if isinstance(saved, list) else [saved]
    if run.rank < len(states):
        set_rng_state(states[run.rank])


def warmup_then_constant(optimizer: torch.optim.Optimizer, warmup_steps: int):
    """Linear warm-up from 0 to the configured lr over `warmup_steps`, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    )


def example_indices(num_examples: int, batch_size: int, run: Run, seed: int,
                    batch: int) -> list[int]:
    """The dataset rows of this rank's `batch`-th batch of the run (0-based).

    Each epoch is a permutation drawn from (seed, epoch); incomplete global batches at
    an epoch's end are dropped. A pure function of `batch`, so resuming at a step replays
    exactly the rows an uninterrupted run would have seen.
    """
    global_batch = batch_size * run.world
    per_epoch = num_examples // global_batch
    epoch, position = divmod(batch, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
    start = (position * run.world + run.rank) * batch_size
    return order[start:start + batch_size].tolist()


# --- metrics: stdout, JSONL, PNG ---------------------------------------------------------


class MetricsLog:
    """Metrics of the main process to stdout (above the progress bar) and a JSONL file.

    resume_step: None starts the file afresh; a resumed run passes its checkpoint's step,
    and the rows logged after it (by the interrupted run, which the resumed run logs
    again) are dropped.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                path.write_text("")
            elif path.exists():
                self._keep_through(resume_step)

    def _keep_through(self, step: int) -> None:
        """Rewrite the file (atomically: a crash keeps the old one) with the rows of
        steps <= step; a line cut short by a crash mid-write is dropped too."""
        kept = []
        for line in self.path.read_text().splitlines():
            record = _json_or_none(line)
            if isinstance(record, dict) and record.get("step", math.inf) <= step:
                kept.append(line + "\n")
        replace_atomic(self.path, lambda f: f.write("".join(kept).encode()))

    def write(self, step: int, metrics: dict[str, float], progress: Any = None) -> None:
        """Append a row; a non-finite value is written as null (NaN and Infinity are not
        JSON, and would break every reader of the file) and shown as nan / inf."""
        if not self.enabled:
            return
        values = {"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}}
        record = {k: v if math.isfinite(v) else None for k, v in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        shown = "  ".join(f"{k}={_short(v)}" for k, v in values.items())
        (progress.write if progress is not None else print)(shown)

    def records(self) -> list[dict[str, float]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


class MetricsWindow:
    """The metrics of the steps since the last logged row, which is their weighted mean.

    `sums` (a plain dict) goes into checkpoints, so that a resumed run logs the same rows
    as an uninterrupted one.
    """

    def __init__(self, sums: dict[str, float] | None = None):
        self.sums = dict(sums or {})

    def add(self, metrics: dict[str, float], weight: float = 1.0) -> None:
        self.sums["_count"] = self.sums.get("_count", 0.0) + weight
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + weight * value

    def flush(self) -> dict[str, float]:
        """The mean of the window, which starts afresh."""
        count = self.sums.pop("_count", 1.0)
        sums, self.sums = self.sums, {}
        return {key: value / count for key, value in sums.items()}


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _short(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def plot_curves(records: list[dict[str, float]], keys: list[str], path: Path,
                title: str) -> Path | None:
    """A PNG of each metric in `keys` against the step; None (and a notice) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'rlhf-fast[plot]')")
        return None
    keys = [k for k in keys if any(r.get(k) is not None for r in records)]
    if not keys:
        return None
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows),
                                squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot(*zip(*points), marker="." if len(points) < 40 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    """A tqdm bar on the main process (tqdm ships with transformers' hub client)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc,
                dynamic_ncols=True, file=sys.stdout)


# --- checkpoints ---------------------------------------------------------------------------


@functools.cache
def process_umask() -> int:
    """The umask, read once (reading it means setting it, briefly, for every thread)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def umask_mode(base: int) -> int:
    """`base` (0o666 for files, 0o777 for folders) less the umask: the mode open() and
    mkdir() would give. mkstemp / mkdtemp create owner-only ones instead."""
    return base & ~process_umask()


# errnos of a write that failed for want of space
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_errno(exc: BaseException) -> int | None:
    """The errno of the out-of-space OSError behind `exc` (itself, or what it was raised
    from or while handling), or None when lack of space is not the cause."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def reporting_a_full_disk(path: Path) -> Iterator[None]:
    """Re-raise a save that failed for want of space as an OSError saying so, naming
    `path`. torch.save's zip writer turns the disk's ENOSPC into a RuntimeError about
    stream positions ("unexpected pos ..."), which would be the last line a user reads;
    the OSError survives only as its context."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        code = disk_full_errno(exc)
        if code is None:
            raise
        raise OSError(code, f"{os.strerror(code)}: the disk is full, could not write "
                            f"{path} (what was there before is intact)") from exc


def replace_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write` a temp file in path's folder, then rename it over `path`.

    A crash mid-write leaves the previous file intact: the rename is atomic (a kill
    leaves the temp file, which `remove_stale_temps` deletes). The file gets the usual
    permissions (as open() would make it), not the temp file's 0600. A full disk raises
    an OSError saying so.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with reporting_a_full_disk(path):
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), umask_mode(0o666))
            os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename over `path`."""
    replace_atomic(path, lambda f: torch.save(state, f))


# the temp files (and folders) replace_atomic and save_pretrained_atomic write into an
# output_dir: "." + the name they become + "." + mkstemp's random part + ".tmp"
STALE_TEMP = re.compile(r"\.(checkpoint-\d+\.pt|value_model\.pt|metrics\.jsonl|final)"
                        r"\.[a-z0-9_]+\.tmp")


def remove_stale_temps(output_dir: str | Path) -> list[Path]:
    """Delete the temp files and folders that saves killed mid-way left in output_dir
    (the run's own saves, once finished, leave none); returns their paths."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    stale = sorted(p for p in directory.iterdir() if STALE_TEMP.fullmatch(p.name))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return stale


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}.pt"


def checkpoints_by_step(output_dir: str | Path) -> list[Path]:
    """The checkpoint-<step>.pt files of output_dir, oldest step first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*.pt")
             if p.stem.removeprefix("checkpoint-").isdigit()]
    return sorted(found, key=lambda p: int(p.stem.removeprefix("checkpoint-")))


def prune_checkpoints(written: Path, keep: int) -> list[Path]:
    """Delete the oldest checkpoints beside `written` (just saved) so that at most `keep`
    remain; `written` itself is never deleted, nor anything when keep is 0. Returns the
    deleted paths. Call it only once `written` is safely on disk."""
    if keep <= 0:
        return []
    others = [p for p in checkpoints_by_step(written.parent) if p != written]
    doomed = others[: max(0, len(others) - (keep - 1))]
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return doomed


def resolve_checkpoint(resume_from: str, output_dir: str | Path) -> Path:
    """`resume_from` as a file, or "latest": the newest checkpoint in output_dir."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_file():
            raise FileNotFoundError(f"resume_from: no checkpoint file at {path}")
        return path
    found = checkpoints_by_step(output_dir)
    if not found:
        raise FileNotFoundError(f"resume_from='latest': no checkpoint-*.pt in {output_dir}")
    return found[-1]


def check_no_checkpoints(output_dir: str | Path) -> None:
    """Refuse to start a run afresh in a folder holding checkpoints: after a crash,
    resume_from="latest" would pick the newest checkpoint there, maybe an earlier run's."""
    found = checkpoints_by_step(output_dir)
    if found:
        raise ValueError(
            f"output_dir {str(output_dir)!r} already holds {len(found)} checkpoint(s) of an "
            f"earlier run (newest: {found[-1].name}); pass resume_from (\"latest\" or a "
            "checkpoint file) to continue it, or choose an empty output_dir"
        )


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be read: cut short, or not a checkpoint at all."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state, read by torch's weights_only unpickler, which builds tensors,
    plain containers and numbers only: a pickle that would run code is refused
    (ValueError) instead of run. A file that cannot be read raises UnreadableCheckpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load checkpoint {path}: it holds objects other than tensors, plain "
            "containers and numbers, and unpickling them could run arbitrary code. The "
            "trainers never write such checkpoints: remove it unless you trust its source"
        ) from exc
    except (OSError, MemoryError):
        raise  # the machine's trouble, not the file's: never a reason to skip it
    except Exception as exc:  # what a cut file raises: RuntimeError, EOFError, IndexError, ...
        raise UnreadableCheckpoint(f"checkpoint {path} cannot be read (cut short by a crash, "
                                   f"or not a checkpoint): {type(exc).__name__}: {exc}"
                                   ) from exc
    if not isinstance(state, dict) or "step" not in state:
        raise UnreadableCheckpoint(f"checkpoint {path} is not a trainer checkpoint (a dict "
                                   f"with a 'step'), got {type(state).__name__}")
    return state


def load_resume_checkpoint(resume_from: str, output_dir: str | Path
                           ) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from and its state: the file `resume_from` (whose failure
    to load raises), or for "latest" the newest checkpoint of output_dir that can be
    read, with a warning naming each newer one skipped (a file cut short by a crash or a
    full disk must not strand the good ones before it). A checkpoint refused as unsafe
    is never skipped: it raises."""
    if resume_from != "latest":
        path = resolve_checkpoint(resume_from, output_dir)
        return path, load_checkpoint(path)
    resolve_checkpoint(resume_from, output_dir)  # raises when there is none
    skipped: list[str] = []
    for path in reversed(checkpoints_by_step(output_dir)):
        try:
            state = load_checkpoint(path)
        except UnreadableCheckpoint as exc:
            skipped.append(str(exc))
            continue
        if skipped:
            warnings.warn(f"resume_from='latest': resuming from {path.name}, skipping newer "
                          f"checkpoints that cannot be read: {'; '.join(skipped)}",
                          stacklevel=2)
        return path, state
    raise UnreadableCheckpoint(f"resume_from='latest': no checkpoint in {output_dir} can be "
                               f"read: {'; '.join(skipped)}")


# --- the models a checkpoint does not hold --------------------------------------------------


# integer dtypes by width: a tensor's bits, viewed as integers, sum exactly
INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of `model`'s state dict: every tensor's name, shape, dtype, and the
    integer sum of its values' bits. Exact and order-free, so the same weights give the
    same fingerprint on any device and thread count. Under FSDP2 a collective (each
    sharded tensor is gathered in turn): every process must call it."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor: its shards, gathered
            tensor = tensor.full_tensor()
        bits = int(tensor.view(INT_OF_WIDTH[tensor.element_size()]).sum(dtype=torch.int64))
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{bits};".encode())
    return digest.hexdigest()[:16]


def model_identity(model: nn.Module | None) -> dict[str, str] | None:
    """What a checkpoint records of a frozen model whose weights it does not hold (a
    reference, a reward model): its name_or_path and `weights_fingerprint`."""
    if model is None:
        return None
    return {"name_or_path": str(getattr(model, "name_or_path", "") or ""),
            "weights": weights_fingerprint(model)}


def _describe(identity: dict[str, str] | None) -> str:
    if identity is None:
        return "none"
    return f"name_or_path {identity['name_or_path']!r}, weights {identity['weights']}"


def check_same_frozen_models(saved: dict[str, Any] | None, current: dict[str, Any],
                             path: Path) -> None:
    """Refuse to resume with frozen models other than the run's (`model_identity` by
    role): their weights are not in the checkpoint, and a different reference would
    silently change every loss from here on. The weights decide (a model moved to
    another folder is the same model); name_or_path helps tell which was which.
    Checkpoints written before they were recorded (saved None) are not checked."""
    if saved is None:
        return
    for role, identity in current.items():
        before = saved.get(role)
        same = (before is None) == (identity is None) and (
            identity is None or before["weights"] == identity["weights"])
        if not same:
            raise ValueError(
                f"resume_from: {path} was written with a different {role} ("
                f"{_describe(before)}) than this trainer's ({_describe(identity)}); "
                f"resume with the {role} the run started with"
            )


def save_pretrained_atomic(model: nn.Module, tokenizer: Any, directory: Path,
                           state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`save_pretrained` (of `state_dict` if given: the gathered weights of a sharded
    model) into a temp folder, then swap it in for `directory`.

    The swap renames `directory` to ``.<name>.old``, the new folder to `directory`, then
    deletes the old one. A crash in between leaves ``.<name>.old`` behind: without
    `directory` it is the previous version (the crash fell between the two renames), and
    the next save replaces it; beside `directory` it is stale, and is deleted first.
    """
    old = directory.with_name(f".{directory.name}.old")
    if old.exists() and directory.exists():
        shutil.rmtree(old)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp",
                                 dir=directory.parent))
    try:
        temp.chmod(umask_mode(0o777))
        with reporting_a_full_disk(directory):
            model.save_pretrained(temp, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if directory.exists():
        os.replace(directory, old)
    os.replace(temp, directory)
    if old.exists():
        shutil.rmtree(old)


def gather_training_state(module: nn.Module, optimizer: torch.optim.Optimizer
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full, unsharded state dicts of `module` and `optimizer`, on the CPU under FSDP2.

    Under FSDP2 this is a collective: every process must call it (each holds one shard;
    saving rank 0's own state dict would lose the others').
    """
    if not is_fsdp2_sharded(module):
        return module.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(module, options=options),
            get_optimizer_state_dict(module, optimizer, options=options))


def restore_training_state(module: nn.Module, optimizer: torch.optim.Optimizer,
                           module_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
    """Load full state dicts written by `gather_training_state` (into shards under FSDP2;
    every process reads the same checkpoint file)."""
    if not is_fsdp2_sharded(module):
        module.load_state_dict(module_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, module_state, options=options)
    set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)


def strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def is_fsdp2_sharded(module: nn.Module) -> bool:
    """True when `fully_shard` (FSDP2) has turned the parameters into DTensors."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


def wrap_ddp(module: nn.Module, run: Run) -> nn.Module:
    """DistributedDataParallel around `module` for several processes, unless FSDP2
    already shards it (then its own hooks reduce the gradients)."""
    if run.world == 1 or is_fsdp2_sharded(module):
        return module
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- data ------------------------------------------------------------------------------------


def load_records(data: Any, fields: tuple[str, ...], name: str) -> list[dict[str, Any]]:
    """Records with string `fields` from a list of dicts, a JSONL path or a
    `datasets.Dataset`; a clear error naming `name` for anything else."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no file at {path}")
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{name}: {path} line {number} is not JSON: {exc}") from exc
    elif hasattr(data, "column_names") and hasattr(data, "__getitem__"):  # datasets.Dataset
        records = [data[i] for i in range(len(data))]
    else:
        records = list(data)
    if not records:
        raise ValueError(f"{name} is empty; expected records with fields {list(fields)}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{name}[{index}] must be a dict with fields {list(fields)}, "
                             f"got {type(record).__name__}")
        for field in fields:
            if not isinstance(record.get(field), str):
                raise ValueError(f"{name}[{index}] needs a string field {field!r}, got "
                                 f"{record.get(field)!r}")
    return records
