"""rlhf_fast.options: each option set is declared once and every consumer derives from it
(the ops' and the reference's signatures and checks, the loss modules, the trainer configs
and the CLI flags)."""

import argparse
import dataclasses
import inspect
import math

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.config_flags import add_config_flags, config_from_args
from rlhf_fast.options import (
    CPO_OPTIONS,
    DIVERGENCE_OPTIONS,
    DPO_OPTIONS,
    GAE_OPTIONS,
    KTO_OPTIONS,
    LOGPROB_OPTIONS,
    ORPO_OPTIONS,
    PPO_OPTIONS,
    SIMPO_OPTIONS,
    TOKEN_OPTIONS,
    TOPK_DIVERGENCE_OPTIONS,
    Option,
    OptionSet,
    real,
)
from rlhf_fast.trainers import DPOConfig, PPOConfig
from rlhf_fast.trainers.ppo_config import TRAINER_SET

CONSUMERS = [  # (option set, function, options it leaves out)
    (PPO_OPTIONS, rlhf_fast.ppo_loss, ()),
    (PPO_OPTIONS, reference.ppo_loss, ()),
    (PPO_OPTIONS, rlhf_fast.PPOLoss, ()),
    (PPO_OPTIONS + LOGPROB_OPTIONS, rlhf_fast.linear_ppo_loss, ()),
    (DPO_OPTIONS, rlhf_fast.dpo_loss, ()),
    (DPO_OPTIONS, reference.dpo_loss, ()),
    (DPO_OPTIONS, rlhf_fast.DPOLoss, ()),
    (DPO_OPTIONS + LOGPROB_OPTIONS, rlhf_fast.linear_dpo_loss, ()),
    (SIMPO_OPTIONS, rlhf_fast.simpo_loss, ()),
    (SIMPO_OPTIONS, reference.simpo_loss, ()),
    (SIMPO_OPTIONS, rlhf_fast.SimPOLoss, ()),
    (CPO_OPTIONS, rlhf_fast.cpo_loss, ()),
    (CPO_OPTIONS, reference.cpo_loss, ()),
    (CPO_OPTIONS, rlhf_fast.CPOLoss, ()),
    (ORPO_OPTIONS, rlhf_fast.orpo_loss, ()),
    (ORPO_OPTIONS, reference.orpo_loss, ()),
    (ORPO_OPTIONS, rlhf_fast.ORPOLoss, ()),
    (KTO_OPTIONS, rlhf_fast.kto_loss, ()),
    (KTO_OPTIONS, reference.kto_loss, ()),
    (KTO_OPTIONS, rlhf_fast.KTOLoss, ()),
    (DIVERGENCE_OPTIONS, rlhf_fast.token_divergence, ()),
    (DIVERGENCE_OPTIONS, reference.token_divergence, ()),
    (DIVERGENCE_OPTIONS, rlhf_fast.TokenDivergence, ()),
    (DIVERGENCE_OPTIONS, rlhf_fast.linear_token_divergence, ()),
    (DIVERGENCE_OPTIONS, reference.linear_token_divergence, ()),
    (DIVERGENCE_OPTIONS, rlhf_fast.LinearTokenDivergence, ()),
    (TOPK_DIVERGENCE_OPTIONS, rlhf_fast.topk_token_divergence, ()),
    (TOPK_DIVERGENCE_OPTIONS, reference.topk_token_divergence, ()),
    (TOPK_DIVERGENCE_OPTIONS, rlhf_fast.TopKTokenDivergence, ()),
    (LOGPROB_OPTIONS, rlhf_fast.logprobs, ()),
    (LOGPROB_OPTIONS, rlhf_fast.linear_logprobs, ()),
    (TOKEN_OPTIONS, reference.logprobs, ()),
    (TOKEN_OPTIONS, reference.linear_logprobs, ()),
    (GAE_OPTIONS, rlhf_fast.gae, ()),
    (GAE_OPTIONS, reference.gae, ()),
]
CONFIGS = [  # (option set, config class, excluded options, the trainer's own defaults)
    (PPO_OPTIONS, PPOConfig, TRAINER_SET, {"kl_coef": 0.05}),
    (GAE_OPTIONS, PPOConfig, (), {}),
    (DPO_OPTIONS, DPOConfig, ("reduction",), {}),
]


@pytest.mark.parametrize("options, function, _", CONSUMERS,
                         ids=[f"{f.__module__}.{f.__qualname__}" for _, f, _ in CONSUMERS])
def test_signatures_list_every_declared_option_with_its_default(options, function, _):
    params = inspect.signature(function).parameters
    doc = (function.__init__ if isinstance(function, type) else function).__doc__
    for option in options.options:
        assert params[option.name].default == option.default, option.name
        assert params[option.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert f"{option.name}: {option.doc[:20]}" in " ".join(doc.split()), option.name


@pytest.mark.parametrize("options, config, excluded, defaults", CONFIGS)
def test_config_fields_and_cli_flags_come_from_the_declaration(options, config, excluded,
                                                               defaults):
    fields = {f.name: f for f in dataclasses.fields(config)}
    parser = argparse.ArgumentParser()
    add_config_flags(parser, config)
    flags = {a.dest: a for a in parser._actions}
    for option in options.options:
        if option.name in excluded:
            assert option.name not in fields
            continue
        default = defaults.get(option.name, option.default)
        assert fields[option.name].default == default
        assert option.doc in fields[option.name].metadata["doc"]
        assert flags[option.name].default == default
        assert option.doc in flags[option.name].help


@pytest.mark.parametrize("options, config, excluded, _", CONFIGS)
def test_config_accepts_exactly_what_the_ops_accept(options, config, excluded, _):
    """For every float option: each value the declaration accepts, the config accepts, and
    each one it refuses the config refuses naming Config.field."""
    for option in options.options:
        if option.name in excluded or option.accepts.kind is not float:
            continue
        for value in (-1.0, 0.0, 0.2, 0.5, 1.0, 1.5, 1e300, math.inf, math.nan):
            try:
                expected = options.check({option.name: value})
            except (TypeError, ValueError) as error:
                with pytest.raises(ValueError) as refused:
                    config(**{option.name: value})
                assert str(refused.value) == f"{config.__name__}.{error}"
                continue
            assert getattr(config(**{option.name: value}), option.name) == getattr(
                expected, option.name)


def test_errors_name_the_argument_or_the_field():
    with pytest.raises(ValueError, match=r"^clip_eps must be >= 0.0 and < 1.0, got 1.5$"):
        PPO_OPTIONS.check({"clip_eps": 1.5})
    with pytest.raises(ValueError, match=r"^PPOConfig.clip_eps must be >= 0.0 and < 1.0, "):
        PPOConfig(clip_eps=1.5)
    with pytest.raises(TypeError, match=r"^kl_coef must be a float, got bool True$"):
        PPO_OPTIONS.check({"kl_coef": True})
    with pytest.raises(ValueError, match=r"^kl_coef must be >= 0.0, got nan$"):
        PPO_OPTIONS.check({"kl_coef": math.nan})
    with pytest.raises(ValueError, match=r"^kl_coef must be representable in fp32"):
        PPO_OPTIONS.check({"kl_coef": 1e-300})
    with pytest.raises(TypeError, match=r"^unexpected option 'clip'; the options are"):
        rlhf_fast.PPOLoss(clip=0.2)
    with pytest.raises(ValueError, match=r"^label_smoothing must be 0 for loss_type 'hinge'"):
        rlhf_fast.DPOLoss(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"^DPOConfig.label_smoothing must be 0 for loss_"):
        DPOConfig(loss_type="hinge", label_smoothing=0.1)


def test_a_new_option_is_one_declaration():
    """A trial option added to a set reaches a function's signature and checks, a config's
    fields and checks, and its CLI flag, with no other code."""
    trial = OptionSet(PPO_OPTIONS.options + (
        Option("trial_cap", 2.0, real("> 1.0", lambda v: 1 < v < math.inf), "a trial bound"),))

    @trial.keywords
    def loss(x: torch.Tensor, **options):
        """A loss."""
        return trial.check(options)

    @dataclasses.dataclass
    @trial.fields(exclude=("max_len",))
    class TrialConfig:
        steps: int = 1

        def __post_init__(self):
            trial.check_fields(self)

    assert inspect.signature(loss).parameters["trial_cap"].default == 2.0
    assert "trial_cap: a trial bound (> 1.0; default 2.0)" in loss.__doc__
    assert loss(torch.zeros(1), trial_cap=3).trial_cap == 3.0
    with pytest.raises(ValueError, match=r"^trial_cap must be > 1.0, got 1.0$"):
        loss(torch.zeros(1), trial_cap=1.0)
    with pytest.raises(ValueError, match=r"^TrialConfig.trial_cap must be > 1.0, got 0.5$"):
        TrialConfig(trial_cap=0.5)
    parser = argparse.ArgumentParser()
    add_config_flags(parser, TrialConfig)
    args = parser.parse_args(["--trial-cap", "4", "--clip-eps", "0.1"])
    config = config_from_args(TrialConfig, args, parser)
    assert (config.trial_cap, config.clip_eps, config.steps) == (4.0, 0.1, 1)


def test_fields_refuse_defaults_of_undeclared_options():
    with pytest.raises(ValueError, match="defaults for options not declared here"):
        PPO_OPTIONS.fields(defaults={"kl_coeff": 0.1})


def test_an_option_renamed_in_a_config_is_checked_and_flagged_under_the_fields_name():
    """`fields(rename=...)`: a config whose own field of an option's name means something
    else (DPOConfig.loss_type: the objective) holds the option under another name
    (DPOConfig.cpo_loss_type): its flag, checks and errors take that name, and
    `field_values` gives it back by the option's name, for the op."""
    @dataclasses.dataclass
    @CPO_OPTIONS.fields(rename={"loss_type": "cpo_loss_type"})
    class TrialConfig:
        loss_type: str = "the objective"

        def __post_init__(self):
            CPO_OPTIONS.check_fields(self)

    config = TrialConfig(cpo_loss_type="hinge", alpha=2)
    assert CPO_OPTIONS.field_values(config) == dict(
        beta=0.1, loss_type="hinge", label_smoothing=0.0, alpha=2.0, reduction="mean")
    assert config.loss_type == "the objective"
    with pytest.raises(ValueError, match=r"^TrialConfig.cpo_loss_type must be one of \("):
        TrialConfig(cpo_loss_type="simpo")
    with pytest.raises(ValueError, match=r"^TrialConfig.label_smoothing must be 0 for "
                                         r"TrialConfig.cpo_loss_type 'ipo'"):
        TrialConfig(cpo_loss_type="ipo", label_smoothing=0.1)
    parser = argparse.ArgumentParser()
    add_config_flags(parser, TrialConfig)
    config = config_from_args(TrialConfig, parser.parse_args(["--cpo-loss-type", "ipo"]),
                              parser)
    assert (config.cpo_loss_type, config.loss_type) == ("ipo", "the objective")
    loss_type = next(o for o in CPO_OPTIONS.options if o.name == "loss_type")
    field = {f.name: f for f in dataclasses.fields(DPOConfig)}["cpo_loss_type"]
    assert loss_type.doc in field.metadata["doc"] and field.default == loss_type.default
    with pytest.raises(ValueError, match=r"renames for options not declared here: \['alpha'"):
        CPO_OPTIONS.fields(exclude=("alpha",), rename={"alpha": "cpo_alpha"})
