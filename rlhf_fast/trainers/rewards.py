"""The PPO trainer's reward sources: functions of the decoded text, called with TRL's
keywords or as ``f(prompts, answers)``, and frozen reward models; their scores checked
finite where they enter."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlhf_fast.trainers.models import as_value_module, frozen

RewardFn = Callable[[list[str], list[str]], Sequence[float] | torch.Tensor]


@dataclass
class Reward:
    """One reward source: a function of the decoded text, or a frozen reward model with
    its per-position scorer; `name` says which in errors."""

    name: str
    function: RewardFn | None = None
    model: nn.Module | None = None
    scorer: nn.Module | None = None

    @classmethod
    def of(cls, source: RewardFn | nn.Module, device: torch.device) -> Reward:
        if callable(source) and not isinstance(source, nn.Module):
            return cls(f"reward function {function_name(source)}", function=source)
        model = frozen(source).to(device)
        return cls("the reward model", model=model, scorer=as_value_module(model))


def reward_sources(reward_fn_or_model: RewardFn | nn.Module | Sequence[RewardFn | nn.Module]
                   | None, weights: Sequence[float] | None, device: torch.device
                   ) -> tuple[list[Reward], torch.Tensor]:
    """The `Reward` of each source (a function, a reward model, or a list of them; None:
    none) and their weights [K] fp32 (`weights`, or 1 each; [1.0] with no source)."""
    sources = list(reward_fn_or_model) if isinstance(reward_fn_or_model, (list, tuple)) \
        else [] if reward_fn_or_model is None else [reward_fn_or_model]
    weights = weights or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ValueError(f"PPOConfig.reward_weights must have one weight per reward "
                         f"function or model ({len(sources)}), got {len(weights)}")
    # (distillation alone scores every answer 0: one column, `AnswerSampler.score`)
    weights = torch.tensor(weights or [1.0], dtype=torch.float32, device=device)
    return [Reward.of(source, device) for source in sources], weights


def function_name(function: Callable[..., Any]) -> str:
    """module.qualname of a function (or the type of a callable object)."""
    named = function if hasattr(function, "__qualname__") else type(function)
    return f"{named.__module__}.{named.__qualname__}"


def takes_trl_keywords(function: Callable[..., Any]) -> bool:
    """Whether a reward function has TRL's signature, ``f(prompts=, completions=,
    completion_ids=, **columns)`` (a `completions` parameter or ``**kwargs``); else it
    is called as ``f(prompts, answers)``."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return any(p.name == "completions" or p.kind is inspect.Parameter.VAR_KEYWORD
               for p in parameters)


def call_reward_function(reward: Reward, records: list[dict[str, Any]], texts: list[str],
                         completion_ids: list[list[int]]) -> torch.Tensor:
    """[B] fp32 scores of a reward function.

    TRL's signature gets, as TRL passes them, the prompts as the data gives them (strings,
    or lists of messages), the completions (the decoded text; for a conversational prompt
    a one-message list, ``[{"role": "assistant", "content": text}]``), their token ids
    (through EOS) and each other dataset column as a list (keyword arguments). The
    plain ``f(prompts, answers)`` gets the prompts as the model saw them (a conversation
    rendered by the chat template) and the decoded answers. A None score (the function
    does not rate that answer) counts 0, as in TRL's nansum over the weighted functions.
    """
    if takes_trl_keywords(reward.function):
        prompts = [record["prompt"] for record in records]
        completions = [[{"role": "assistant", "content": text}] if isinstance(prompt, list)
                       else text for prompt, text in zip(prompts, texts)]
        columns = {key: [record.get(key) for record in records] for key in records[0]
                   if key not in ("prompt", "prompt_text", "completion", "completion_ids")}
        given = reward.function(prompts=prompts, completions=completions,
                                completion_ids=completion_ids, **columns)
    else:
        given = reward.function([record["prompt_text"] for record in records], texts)
    if not torch.is_tensor(given):
        given = [0.0 if score is None else score for score in given]
    scores = torch.as_tensor(given, dtype=torch.float32)
    if scores.shape != (len(records),):
        raise ValueError(f"{reward.name} must return {len(records)} scores, got "
                         f"shape {tuple(scores.shape)}")
    return scores


def check_finite_scores(scores: torch.Tensor, source: str) -> torch.Tensor:
    """`scores` [B], unless one is NaN or infinite: it would make every advantage of its
    group NaN, NaN weights after the update, and the next rollout fail in sampling."""
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{source} gave non-finite scores (NaN or inf) to {len(bad)} of "
                         f"{scores.numel()} answers, e.g. answer {bad[0]}: "
                         f"{scores[bad[0]].item()}; scores must be finite numbers")
    return scores
