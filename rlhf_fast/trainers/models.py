"""The model side of the trainers: a causal LM as per-token log-probs (`TokenLogprobs`),
critics and reward models as per-position scalars (`ValueModel`, `as_value_module`),
PPO's policy and critic in one module (`ActorCritic`), and what a trained or frozen
model is made ready with (dropout, checkpointing, freezing, its generation config).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_fast import linear_logprobs, linear_ppo_loss, logprobs
from rlhf_fast.trainers.model_state import (
    is_peft_model,
    model_identity,
    weights_fingerprint,
)
from rlhf_fast.trainers.run import is_fsdp2_sharded

#: The label of the last position, which predicts nothing (token ids are >= 0).
IGNORE_INDEX = -100

if TYPE_CHECKING:
    from transformers import GenerationConfig


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

    forward(input_ids [B, L], attention_mask [B, L]) -> logp [B, L-1] fp32 (and entropy,
    log sum_j p_j^2 [B, L-1] fp32 as asked): logp[:, t] = log p(input_ids[:, t+1] |
    input_ids[:, :t+1]) at `temperature`. With `fused_linear`, `rlhf_fast.linear_logprobs`
    on the last hidden state and the lm_head weight (the logits never exist); else
    `rlhf_fast.logprobs` on the model's logits.
    """

    def __init__(self, model: nn.Module, *, fused_linear: bool, temperature: float = 1.0,
                 adapters_off: bool = False):
        super().__init__()
        if fused_linear:
            check_fused_linear_supported(model)
        if adapters_off and not is_peft_model(model):
            raise ValueError("adapters_off needs a peft model (one with disable_adapter)")
        self.model = model
        self.fused_linear = fused_linear
        self.temperature = temperature
        self.adapters_off = adapters_off

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_entropy: bool = False,
        return_sum_p2: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """With adapters_off, the base model's log-probs: the forward runs under the peft
        model's disable_adapter (a LoRA policy's reference, without a second copy)."""
        with self.model.disable_adapter() if self.adapters_off else contextlib.nullcontext():
            return self._forward(input_ids, attention_mask, return_entropy, return_sum_p2)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 return_entropy: bool, return_sum_p2: bool
                 ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        position_ids = position_ids_from(attention_mask)
        labels = input_ids[:, 1:]
        options = dict(temperature=self.temperature, return_entropy=return_entropy,
                       return_sum_p2=return_sum_p2)
        if not self.fused_linear:
            logits = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False,
            ).logits
            # Shifted labels on the whole logits, the last position ignored: the kernel
            # writes the logits' gradient whole, where logits[:, :-1] would cost autograd's
            # slice backward a second [B, L, V] buffer and pass.
            shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)
            outputs = logprobs(logits, shifted, ignore_index=IGNORE_INDEX, **options)
            if torch.is_tensor(outputs):
                return outputs[:, :-1]
            return tuple(output[:, :-1] for output in outputs)
        hidden, head = self.hidden_and_head(input_ids, attention_mask)
        # under autocast, linear_logprobs runs its GEMMs in autocast's dtype, as the
        # lm_head would, and returns fp32 master weights an fp32 gradient
        return linear_logprobs(hidden, head.weight, labels, bias=head.bias, **options)

    def hidden_and_head(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                        ) -> tuple[torch.Tensor, nn.Module]:
        """(the last hidden state before each next token [B, L-1, D], the lm_head), for
        the fused-linear ops."""
        hidden = backbone_of(self.model)(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids_from(attention_mask), use_cache=False,
        ).last_hidden_state[:, :-1]
        head = self.model.get_output_embeddings()
        if not torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(head.weight.dtype)  # as the lm_head would cast it
        return hidden, head


#: the file stem of a saved ValueModel's head, beside its backbone's transformers files
HEAD_FILE = "value_head"


def _with_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of `state` under `prefix`, the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def is_saved_value_model(name_or_path: str | Path) -> bool:
    """Whether `name_or_path` is a folder `ValueModel.save_pretrained` wrote (its head
    beside the backbone), rather than a sequence classifier's."""
    return (Path(name_or_path) / f"{HEAD_FILE}.safetensors").is_file()


def lora_config_of(config: Any) -> Any:
    """The peft ``LoraConfig`` of a trainer config's lora_* fields (use_peft)."""
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules)


def with_adapter(model: nn.Module, config: Any, peft_config: Any = None) -> nn.Module:
    """`model` with a fresh LoRA adapter to train (peft's get_peft_model: the base
    weights frozen), when `peft_config` is given or config.use_peft; else `model`."""
    if peft_config is None and not config.use_peft:
        return model
    if is_peft_model(model):
        raise ValueError("the model has peft adapters already: pass peft_config=None and "
                         "use_peft=False to train them")
    try:
        from peft import get_peft_model
    except ImportError as exc:
        raise ImportError("peft_config / use_peft need the 'peft' package (pip install "
                          "peft)") from exc
    return get_peft_model(model, peft_config or lora_config_of(config))


def reference_logprobs(policy: nn.Module, reference: nn.Module | None, *,
                       fused_linear: bool, temperature: float = 1.0) -> TokenLogprobs:
    """The frozen reference's log-probs: `reference`; with none, the policy's base model
    with its adapter disabled when the policy is a peft model (no copy), else a frozen
    copy of the policy as it is now."""
    if reference is None and is_peft_model(policy):
        return TokenLogprobs(policy, fused_linear=fused_linear, temperature=temperature,
                             adapters_off=True)
    model = copy.deepcopy(policy) if reference is None else reference
    return TokenLogprobs(frozen(model), fused_linear=fused_linear, temperature=temperature)


def reference_identity(reference: TokenLogprobs) -> dict[str, str] | None:
    """What checkpoints record of the reference: `model_identity`, or for a policy's
    disabled adapter its frozen base's (the adapter's weights change as it trains; the
    base's, which the checkpoint does not hold, must not)."""
    if reference.adapters_off:
        base = str(getattr(reference.model, "name_or_path", "") or "")
        return {"name_or_path": f"the policy with its adapter disabled ({base})",
                "weights": weights_fingerprint(reference.model, without_adapters=True)}
    return model_identity(reference.model)


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

    #: the safetensors files of a saved ValueModel (`save_pretrained`), by file stem: the
    #: prefix their keys take in the ValueModel's state dict
    WEIGHT_FILES = {"model": "backbone.", HEAD_FILE: "head."}

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> ValueModel:
        """The backbone of a transformers folder or hub id (`AutoModel`), and the value
        head saved beside it by `save_pretrained` (value_head.safetensors) when there
        is one; else a zero head, as `from_causal_lm` gives."""
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(name_or_path, **kwargs)
        critic = cls(backbone, backbone.config.hidden_size)
        if is_saved_value_model(name_or_path):
            from safetensors.torch import load_file

            head = load_file(Path(name_or_path) / f"{HEAD_FILE}.safetensors")
            critic.head.load_state_dict(head)
        return critic

    def save_pretrained(self, directory: str | Path,
                        state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any
                        ) -> None:
        """The backbone as a transformers folder (safetensors) and the head beside it in
        value_head.safetensors: `from_pretrained` reads both back, and `AutoModel` the
        backbone alone. `state_dict`: this module's (the gathered weights of a sharded
        one); kwargs go to the backbone's save_pretrained."""
        from rlhf_fast.trainers.files import save_safetensors

        state = self.state_dict() if state_dict is None else state_dict
        kwargs["safe_serialization"] = True
        self.backbone.save_pretrained(directory, state_dict=_with_prefix(state, "backbone."),
                                      **kwargs)
        head = {k: v.detach().contiguous() for k, v in _with_prefix(state, "head.").items()}
        save_safetensors(head, Path(directory) / f"{HEAD_FILE}.safetensors")

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


def prepare_for_training(model: nn.Module, config: Any) -> None:
    """Zero `model`'s dropout and turn on its activation checkpointing, as the trainer
    config's disable_dropout and gradient_checkpointing ask."""
    if config.disable_dropout:
        disable_dropout(model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)


def frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode with no parameter requiring a gradient."""
    return model.eval().requires_grad_(False)


class ActorCritic(nn.Module):
    """Policy log-probs (and entropy) and critic values over the answer positions, in
    one module so DistributedDataParallel can wrap both.

    forward(sequences [B, P+R], attention_mask, prompt_width P) ->
    logp [B, R], entropy [B, R], values [B, R] or None, and with `return_sum_p2` log
    sum_j p_j^2 [B, R] (the optimal token baseline's); all fp32. With `ppo` (the keyword
    arguments of `linear_ppo_loss` but the hidden states, weights, labels and values) and
    a fused-linear actor: the `PPOLossOutput` of `linear_ppo_loss` on the answer tokens
    instead, whose backward needs no GEMM (3 in all, where `linear_logprobs` then
    `ppo_loss` take 4), the prompt tokens never reaching the lm_head.
    """

    def __init__(self, actor: TokenLogprobs, critic: nn.Module | None):
        super().__init__()
        self.actor = actor
        self.critic = critic

    def forward(self, sequences: torch.Tensor, attention_mask: torch.Tensor,
                prompt_width: int, ppo: dict[str, Any] | None = None,
                return_sum_p2: bool = False):
        answer = slice(prompt_width - 1, None)  # label t is token t + 1
        values = None
        if self.critic is not None:
            # the value of the state before each answer token
            values = self.critic(sequences, attention_mask)[:, prompt_width - 1:-1]
        if ppo is not None:
            hidden, head = self.actor.hidden_and_head(sequences, attention_mask)
            return linear_ppo_loss(
                hidden[:, answer], head.weight, sequences[:, 1:][:, answer], bias=head.bias,
                values=values, temperature=self.actor.temperature, **ppo)
        outputs = self.actor(sequences, attention_mask, return_entropy=True,
                             return_sum_p2=return_sum_p2)
        logp, entropy, *sum_p2 = (output[:, answer] for output in outputs)
        return (logp, entropy, values, *sum_p2)


@contextlib.contextmanager
def only_generation_config(model: nn.Module, generation_config: GenerationConfig
                           ) -> Iterator[None]:
    """Make `generation_config` the model's own while the block runs.

    `generate` fills every field an explicit generation_config leaves unset from
    ``model.generation_config`` (a hub model's repetition_penalty, suppress_tokens, ...);
    with the two the same, only transformers' neutral defaults fill them.
    """
    # a peft model generates with its base model's generation_config
    model = model.get_base_model() if is_peft_model(model) else model
    own = model.generation_config
    model.generation_config = generation_config
    try:
        yield
    finally:
        model.generation_config = own
