"""The trainers' configs on the command line as a TRL user writes them: both spellings of
every flag, TRL's names, --config files, how models load, reward functions by name,
--device, --overwrite-output-dir, and resuming under a changed config.

Mostly parse-only; one tiny end-to-end run covers resume, the new lr and the end-of-run
message.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rlhf_fast import cli_train
from rlhf_fast.cli import main, parse_command_line
from rlhf_fast.cli_train import import_function
from rlhf_fast.config_flags import HF_FIELD_PARSER, config_from_args, hf_field_parser
from rlhf_fast.demo import DATA, read_jsonl, tiny_llama, train_tokenizer
from rlhf_fast.trainers import DPOConfig, PPOConfig
from rlhf_fast.trainers.resume import changed_fields

DPO = ["train", "dpo", "--model", "m", "--data", "d"]
PPO = ["train", "ppo", "--model", "m", "--data", "d"]


def _config(argv: list[str]):
    args, parser = parse_command_line(argv)
    return config_from_args(DPOConfig if args.algorithm == "dpo" else PPOConfig, args, parser)


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_the_installed_transformers_has_the_private_method_the_flags_are_built_with():
    """config_flags builds each field's flags with HfArgumentParser's private
    _parse_dataclass_field(parser, field): this transformers has it."""
    from transformers import HfArgumentParser

    assert hf_field_parser() is getattr(HfArgumentParser, HF_FIELD_PARSER)


@pytest.mark.parametrize("replacement, found", [
    (None, "lacks it"),
    (staticmethod(lambda parser, field, extra: None), r"has it taking \['parser', 'field', "
                                                      r"'extra'\]"),
])
def test_a_transformers_without_that_method_is_a_clear_error(monkeypatch, replacement, found):
    import transformers
    from transformers import HfArgumentParser

    if replacement is None:
        monkeypatch.delattr(HfArgumentParser, HF_FIELD_PARSER)
    else:
        monkeypatch.setattr(HfArgumentParser, HF_FIELD_PARSER, replacement)
    with pytest.raises(RuntimeError, match=(
            r"HfArgumentParser\._parse_dataclass_field\(parser, field\), and transformers "
            rf"{transformers.__version__} {found}; transformers 4\.46 through 5\.25 have it")):
        parse_command_line(DPO)


@pytest.mark.parametrize("flags", [
    ["--max-steps", "5", "--weight-decay", "0.1", "--no-whiten-advantages",
     "--clip-eps-high", "none", "--reward-weights", "1", "2"],
    ["--max_steps", "5", "--weight_decay", "0.1", "--whiten_advantages", "false",
     "--clip_eps_high", "None", "--reward_weights", "1", "2"],
], ids=["dashes", "underscores"])
def test_every_flag_takes_both_spellings(flags):
    config = _config(PPO + flags)
    assert (config.max_steps, config.weight_decay, config.whiten_advantages,
            config.clip_eps_high, config.reward_weights) == (5, 0.1, False, None, [1.0, 2.0])


def test_bools_take_a_value_or_none_and_their_negation_none():
    assert _config(DPO + ["--use-fused-linear", "none"]).use_fused_linear is None
    assert _config(DPO + ["--use_fused_linear", "yes"]).use_fused_linear is True
    assert _config(DPO + ["--reference-free", "--loss-type", "ipo"]).reference_free is True
    assert _config(DPO + ["--no_disable_dropout"]).disable_dropout is False
    assert _config(PPO + ["--reward-weights", "none"]).reward_weights is None


def test_negated_bool_refuses_a_value(capsys):
    assert "--no-disable-dropout takes no value" in _usage_error(
        DPO + ["--no-disable-dropout", "true"], capsys)


def test_trls_names_as_flags_and_constructor_keywords():
    config = _config(["train", "dpo", "--model_name_or_path", "m", "--data", "d",
                      "--learning_rate", "1e-5", "--per_device_train_batch_size", "4",
                      "--per-device-eval-batch-size", "2", "--num_train_epochs", "2",
                      "--gradient_accumulation_steps", "3", "--beta", "0.2",
                      "--precompute_ref_log_probs", "--resume_from_checkpoint", "latest"])
    assert (config.lr, config.batch_size, config.eval_batch_size, config.num_epochs,
            config.gradient_accumulation_steps, config.beta, config.precompute_ref_logps,
            config.resume_from) == (1e-5, 4, 2, 2.0, 3, 0.2, True, "latest")
    assert DPOConfig(learning_rate=2e-6, per_device_train_batch_size=2) == DPOConfig(
        lr=2e-6, batch_size=2)
    assert PPOConfig(loss_type="dr_grpo", num_iterations=2, beta=0.0) == PPOConfig(
        agg="seq-mean-token-sum-norm", ppo_epochs=2, kl_coef=0.0)
    with pytest.raises(ValueError, match=r"\['lr'\] given both by name and by TRL's name"):
        DPOConfig(lr=1e-6, learning_rate=1e-5)
    ppo = _config(PPO + ["--num_iterations", "2", "--loss_type", "dapo"])
    assert (ppo.ppo_epochs, ppo.agg) == (2, "token-mean")
    assert PPOConfig(sapo_temperature_pos=0.5, sapo_temperature_neg=2.0,
                     vllm_importance_sampling_mode="sequence_mask",
                     vllm_importance_sampling_clip_min=0.25) == PPOConfig(
        tau_pos=0.5, tau_neg=2.0, rollout_is="sequence", rollout_is_threshold="0.25_3.0")
    assert PPOConfig(vllm_importance_sampling_mode="token_truncate",
                     vllm_importance_sampling_clip_max=1.5) == PPOConfig(
        rollout_is="token", rollout_is_threshold=1.5)
    assert PPOConfig(vllm_importance_sampling_correction=False,
                     vllm_importance_sampling_mode="token_mask").rollout_is is None
    with pytest.raises(ValueError, match=r"\['rollout_is'\] given both by name and by TRL's"):
        PPOConfig(rollout_is="token", vllm_importance_sampling_mode="token_mask")
    ppo = _config(PPO + ["--sapo_temperature_neg", "1.5", "--vllm_importance_sampling_mode",
                         "token_mask", "--vllm_importance_sampling_clip_max", "2"])
    assert (ppo.tau_neg, ppo.rollout_is, ppo.rollout_is_threshold) == (
        1.5, "token", "0.0_2.0")


def test_cpo_loss_type_is_a_flag_of_its_own():
    """TRL CPOTrainer's loss_type (sigmoid, hinge, ipo) is --cpo-loss-type: --loss-type
    picks the objective (cpo)."""
    config = _config(DPO + ["--loss-type", "cpo", "--cpo-loss-type", "hinge", "--alpha", "0.5"])
    assert (config.loss_type, config.cpo_loss_type, config.alpha) == ("cpo", "hinge", 0.5)
    assert _config(DPO + ["--loss_type", "cpo", "--cpo_loss_type", "ipo"]).cpo_loss_type == "ipo"
    assert _config(DPO + ["--loss-type", "cpo"]).cpo_loss_type == "sigmoid"


def test_dpo_loss_options_are_flags():
    config = _config(DPO + ["--loss-type", "discopop", "--discopop-tau", "0.1",
                            "--f-divergence-type", "alpha_divergence",
                            "--f_alpha_divergence_coef", "0.3"])
    assert (config.loss_type, config.discopop_tau, config.f_divergence_type,
            config.f_alpha_divergence_coef) == ("discopop", 0.1, "alpha_divergence", 0.3)
    assert _config(DPO + ["--loss-type", "aot_unpaired"]).loss_type == "aot_unpaired"
    assert _config(DPO + ["--loss-type", "sft"]).loss_type == "sft"


def test_trl_names_never_shadow_a_field():
    """A TRL name that is also a field of ours would be two flags for one name."""
    import dataclasses

    for config in (DPOConfig, PPOConfig):
        fields = {f.name for f in dataclasses.fields(config)}
        assert not fields & set(config.trl_names), config.__name__


def test_config_errors_are_usage_errors_naming_the_flag(capsys):
    error = _usage_error(DPO + ["--learning-rate", "-1"], capsys)
    assert "--lr: DPOConfig.lr must be a finite float > 0, got -1.0" in error


CONFIG_VALUES = {"model_name_or_path": "from-file", "data": "pairs.jsonl",
                 "learning_rate": 1e-5, "max-steps": 7, "loss_type": ["sigmoid", "sft"],
                 "loss_weights": [1.0, 0.5], "use_fused_linear": False, "dtype": "bfloat16",
                 "resume_from": None}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_file_sets_flags_and_the_command_line_overrides_it(suffix, tmp_path):
    import yaml

    path = tmp_path / f"run{suffix}"
    path.write_text(yaml.safe_dump(CONFIG_VALUES) if suffix == ".yaml"
                    else json.dumps(CONFIG_VALUES))
    args, parser = parse_command_line(["train", "dpo", "--config", str(path),
                                       "--max_steps", "3", "--model", "from-cli"])
    config = config_from_args(DPOConfig, args, parser)
    assert (args.model, args.data, args.dtype) == ("from-cli", "pairs.jsonl", "bfloat16")
    assert (config.lr, config.max_steps, config.loss_type, config.loss_weights,
            config.use_fused_linear) == (1e-5, 3, ("sigmoid", "sft"), (1.0, 0.5), False)


def test_yaml_strings_are_converted_like_flags(tmp_path):
    """PyYAML reads 1e-5 (no dot) as a string: it is converted as --lr 1e-5 would be."""
    path = tmp_path / "run.yml"
    path.write_text("lr: 1e-5\nmax_steps: '4'\nuse_fused_linear: none\n")
    config = _config(DPO + ["--config", str(path)])
    assert (config.lr, config.max_steps, config.use_fused_linear) == (1e-5, 4, None)


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 1e-5\nlearning_rat: 2\n", "unknown key 'learning_rat'"),
    ("[1, 2]\n", "expected a mapping of field names to values, got list"),
    ("lr: [unclosed\n", "not valid YAML"),
])
def test_a_bad_config_file_is_a_usage_error_naming_the_file(text, message, tmp_path,
                                                            capsys):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    error = _usage_error(DPO + ["--config", str(path)], capsys)
    assert f"--config {path}: {message}" in error


def test_model_and_data_are_required_from_flags_or_file(capsys):
    error = _usage_error(["train", "dpo", "--data", "d"], capsys)
    assert "required: --model" in error


def test_model_loading_flags_reach_from_pretrained(monkeypatch):
    import transformers

    calls = []

    class Recorder:
        @staticmethod
        def from_pretrained(name, **kwargs):
            calls.append((name, kwargs))
            return "model"

    for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(transformers, name, Recorder)
    args, _ = parse_command_line(DPO + ["--dtype", "bfloat16", "--attn-implementation",
                                        "sdpa", "--trust-remote-code"])
    cli_train.load_causal_lm("policy", args)
    cli_train.load_sequence_scorer("rm", args)
    defaults, _ = parse_command_line(DPO)
    cli_train.load_causal_lm("plain", defaults)
    dtype_key = next(k for k in calls[0][1] if "dtype" in k)
    assert calls[0] == ("policy", {dtype_key: torch.bfloat16, "trust_remote_code": True,
                                   "attn_implementation": "sdpa"})
    assert calls[1][1]["num_labels"] == 1 and calls[1][1][dtype_key] is torch.bfloat16
    assert calls[2] == ("plain", {dtype_key: torch.float32, "trust_remote_code": False})
    auto, _ = parse_command_line(DPO + ["--torch_dtype", "auto"])
    assert cli_train.model_kwargs(auto)[dtype_key] == "auto"


REWARDS = "def score(prompts, answers):\n    return [float(len(a)) for a in answers]\n"


def test_reward_functions_from_the_current_folder_and_from_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "my_cwd_rewards.py").write_text(REWARDS)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my_file_rewards.py").write_text(REWARDS)
    try:
        assert import_function("my_cwd_rewards:score")(["p"], ["abc"]) == [3.0]
        assert import_function("sub/my_file_rewards.py:score")(["p"], ["ab"]) == [2.0]
        assert import_function(f"{tmp_path}/sub/my_file_rewards.py:score")([], []) == []
    finally:
        for name in ("my_cwd_rewards", "my_file_rewards"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("spec, message", [
    ("no_such_rewards_module:score", "--reward-fn no_such_rewards_module:score: no module "
                                     "named 'no_such_rewards_module'"),
    ("rlhf_fast.demo:no_such_function", "rlhf_fast.demo has no function 'no_such_function'"),
    ("missing/rewards.py:score", "no such file missing/rewards.py"),
    ("score", "must look like package.module:function or path/to/file.py:function"),
])
def test_a_bad_reward_function_is_a_usage_error(spec, message, tmp_path, monkeypatch, capsys):
    """Before any model loads: the hub id here is never downloaded."""
    monkeypatch.chdir(tmp_path)
    error = _usage_error(["train", "ppo", "--model", "some-org/never-loaded", "--data",
                          str(DATA / "prompts.txt"), "--output-dir", str(tmp_path / "out"),
                          "--reward-fn", spec], capsys)
    assert message in error


@pytest.mark.parametrize("device, cuda, message", [
    ("cuda:7", None, "--device cuda:7: there are 0 CUDA GPU(s)"),
    ("cuda", "cpu-only", "--device cuda: this torch is a CPU-only build; available: cpu"),
    ("cuda:3", "one-gpu", "--device cuda:3: there is 1 CUDA GPU(s); available: cpu, cuda:0"),
    ("gpu", None, "--device gpu: not a device name; available: cpu"),
])
def test_a_missing_device_is_a_usage_error_before_models_load(device, cuda, message,
                                                               monkeypatch, capsys, tmp_path):
    if cuda == "cpu-only":
        monkeypatch.setattr(torch.version, "cuda", None)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    elif cuda == "one-gpu":
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    else:  # a CUDA build with no GPU visible, whatever this machine has
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        message = message.replace("there are 0 CUDA GPU(s)", "no CUDA GPU is visible")
    error = _usage_error(["train", "dpo", "--model", "no/such/model", "--data",
                          str(DATA / "preferences_train.jsonl"),
                          "--output-dir", str(tmp_path), "--device", device], capsys)
    assert message in error


def test_overwrite_output_dir(tmp_path, capsys):
    """Refused without the flag (the message names it); with it, a fresh run's start
    deletes the earlier checkpoints."""
    from rlhf_fast.trainers.loop import start_run

    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")  # an earlier run's
    error = _usage_error(["train", "dpo", "--model", "no/such/model", "--data", "unused",
                          "--output-dir", str(tmp_path)], capsys)
    assert "already holds 1 checkpoint(s)" in error and "--overwrite-output-dir" in error
    with pytest.raises(ValueError, match="already holds 1 checkpoint"):
        start_run(DPOConfig(output_dir=str(tmp_path), device="cpu"))
    start_run(DPOConfig(output_dir=str(tmp_path), device="cpu", overwrite_output_dir=True))
    assert not (tmp_path / "checkpoint-3").exists()


def test_changed_fields_name_old_and_new_values():
    saved = {"lr": 1e-6, "beta": 0.1, "resume_from": None, "gone": 1}
    current = {"lr": 1e-5, "beta": 0.1, "resume_from": "latest", "new_field": 2}
    assert changed_fields(saved, current) == {"lr": (1e-6, 1e-5)}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    corpus = read_jsonl(DATA / "corpus.jsonl")
    tokenizer = train_tokenizer([r["prompt"] for r in corpus] + [r["completion"] for r in corpus])
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer, hidden_size=32, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_resume_warns_of_changed_fields_and_takes_the_new_lr(saved_model, tmp_path,
                                                             monkeypatch, capsys):
    """The resumed run logs the new lr (not the checkpoint's schedule's), a warning names
    the changed fields old -> new, and the end of each run says where its outputs are."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    out = tmp_path / "dpo"
    base = ["train", "dpo", "--model", str(saved_model), "--data",
            str(DATA / "preferences_train.jsonl"), "--output-dir", str(out),
            "--device", "cpu", "--batch-size", "2", "--max-length", "40",
            "--max-prompt-length", "16", "--logging-steps", "1", "--no-use-fused-linear",
            # constant: the default linear decay would scale the new lr by the run's end
            "--lr-scheduler-type", "constant"]
    assert main(base + ["--lr", "1e-3", "--max-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"outputs in {out}:" in printed and f"model:       {out / 'final'}" in printed
    assert str(out / "metrics.jsonl") in printed and "checkpoints: 1 in" in printed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(base + ["--learning_rate", "2e-3", "--max-steps", "2",
                            "--resume-from", "latest"]) == 0
    messages = [str(w.message) for w in caught if "resuming from" in str(w.message)]
    assert len(messages) == 1
    assert "lr: 0.001 -> 0.002" in messages[0] and "max_steps: 1 -> 2" in messages[0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in rows] == [(1, 1e-3), (2, 2e-3)]
