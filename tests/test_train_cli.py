"""`rlhf-fast train dpo|ppo` on local artifacts (a saved tiny model and tokenizer, the
shipped data), the config flags, and the trainers under DistributedDataParallel.

The ops run their reference backend here: the trainers' use of the Triton kernels is
covered by test_trainers.py, and these tests are about plumbing.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import run_ranks, sequence_classifier
from rlhf_fast.cli import build_parser, main
from rlhf_fast.demo import DATA, read_jsonl, tiny_llama, train_tokenizer
from rlhf_fast.trainers import DPOConfig, PPOConfig


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny Llama and its tokenizer saved as a user's local checkpoint folder."""
    corpus = read_jsonl(DATA / "corpus.jsonl")
    tokenizer = train_tokenizer([r["prompt"] for r in corpus] + [r["completion"] for r in corpus])
    model = tiny_llama(tokenizer, hidden_size=32, seed=3)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _changed(before: Path, after: Path) -> bool:
    old = AutoModelForCausalLM.from_pretrained(before).state_dict()
    new = AutoModelForCausalLM.from_pretrained(after).state_dict()
    assert old.keys() == new.keys()
    return any(not torch.equal(old[k], new[k]) for k in old)


def test_train_dpo_from_a_local_folder(saved_model, tmp_path, torch_backend):
    out = tmp_path / "dpo"
    code = main(["train", "dpo", "--model", str(saved_model),
                 "--data", str(DATA / "preferences_train.jsonl"),
                 "--eval-data", str(DATA / "preferences_eval.jsonl"),
                 "--output-dir", str(out), "--device", "cpu", "--lr", "1e-3",
                 "--batch-size", "4", "--max-steps", "3", "--logging-steps", "1",
                 "--max-length", "40", "--max-prompt-length", "16", "--loss-type", "ipo",
                 "--no-use-fused-linear"])
    assert code == 0
    records = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    # the default schedule, TRL's: linear decay from lr to 0 over the 3 steps
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx(
        [1e-3, 2e-3 / 3, 1e-3 / 3], abs=1e-6)  # (metrics.jsonl rounds to 6 decimals)
    assert "eval/rewards/accuracies" in records[-1]
    assert (out / "checkpoint-3").is_dir()
    assert _changed(saved_model, out / "final")


#: The --loss-type value and flags of each case beyond a plain objective
LOSS_FLAGS = {
    "mpo": ["sigmoid", "bco_pair", "sft", "--loss-weights", "0.8", "0.2", "1.0",
            "--ld-alpha", "0.5", "--use-weighting"],
    "cpo": ["cpo", "--cpo-loss-type", "hinge", "--alpha", "0.5"],
    "discopop": ["discopop", "--f-divergence-type", "alpha_divergence",
                 "--f-alpha-divergence-coef", "0.3"],
}


@pytest.mark.parametrize("loss_type", ["orpo", "kto", "mpo", "cpo", "discopop"])
def test_train_dpo_with_another_objective(saved_model, tmp_path, torch_backend, loss_type):
    """--loss-type orpo on the pairs; kto on unpaired records {prompt, completion, label}
    (made here from the shipped pairs), read as such by --data; a mix of dpo_loss's types
    with their weights (TRL's MPO) on LD-DPO's WPO-weighted log-probs; cpo with TRL
    CPOTrainer's loss_type hinge (--cpo-loss-type); discopop on alpha-divergence scores."""
    data = DATA / "preferences_train.jsonl"
    if loss_type == "kto":
        pairs = read_jsonl(data)
        data = tmp_path / "unpaired.jsonl"
        data.write_text("".join(
            json.dumps({"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"})
            + "\n" for p in pairs for key in ("chosen", "rejected")))
    out = tmp_path / loss_type
    code = main(["train", "dpo", "--model", str(saved_model), "--data", str(data),
                 "--loss-type", *LOSS_FLAGS.get(loss_type, [loss_type]),
                 "--output-dir", str(out), "--device", "cpu",
                 "--lr", "1e-3", "--batch-size", "4", "--max-steps", "2",
                 "--logging-steps", "1", "--max-length", "40", "--max-prompt-length", "16",
                 "--no-use-fused-linear"])
    assert code == 0
    records = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert ("kl" in records[0]) == (loss_type == "kto")
    assert _changed(saved_model, out / "final")


REWARD_MODULE = '''
def parity_and_length(prompts, answers):
    """Odd rows above 0.55, even rows below 0.45: the two answers of each GRPO group
    (consecutive rows) always score differently, whatever the untrained model writes."""
    return [0.55 * (i % 2) + 0.45 * min(len(a), 20) / 20 for i, a in enumerate(answers)]
'''


def test_train_ppo_with_a_reward_function(saved_model, tmp_path, torch_backend, monkeypatch):
    """--reward-fn imports the function and the run trains on its scores. Its scores
    differ within every group: a reward the untrained model never earns (an all-zero
    group) gives advantages of 0, and weights that cannot change."""
    (tmp_path / "cli_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "ppo"
    code = main(["train", "ppo", "--model", str(saved_model),
                 "--data", str(DATA / "prompts.txt"),
                 "--reward-fn", "cli_test_rewards:parity_and_length",
                 "--output-dir", str(out), "--device", "cpu", "--lr", "1e-3",
                 "--advantage-estimator", "grpo", "--group-size", "2",
                 "--rollout-batch-size", "2", "--mini-batch-size", "4", "--ppo-epochs", "1",
                 "--max-new-tokens", "5", "--max-steps", "2", "--clip-eps-high", "0.28"])
    assert code == 0
    records = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(0 <= r["reward"] <= 1 and 1 <= r["response_length"] <= 5 for r in records)
    assert _changed(saved_model, out / "final")


def test_train_ppo_distilling_a_teacher_alone(saved_model, tmp_path, torch_backend):
    """--teacher-model without a reward: on-policy distillation, the teacher's per-token
    rewards the only signal; its reverse KL is logged."""
    teacher = AutoModelForCausalLM.from_pretrained(saved_model)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3.0)  # sharper than the student
    teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "distill"
    code = main(["train", "ppo", "--model", str(saved_model),
                 "--data", str(DATA / "prompts.txt"), "--teacher-model", str(tmp_path / "teacher"),
                 "--distill-coef", "1.0", "--output-dir", str(out), "--device", "cpu",
                 "--lr", "1e-3", "--advantage-estimator", "grpo", "--group-size", "2",
                 "--rollout-batch-size", "2", "--mini-batch-size", "4", "--ppo-epochs", "1",
                 "--max-new-tokens", "5", "--max-steps", "2", "--kl-coef", "0"])
    assert code == 0
    records = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    # (teacher_kl: the k1 estimate summed over an answer's sampled tokens, of any sign)
    assert all(r["reward"] == 0 and math.isfinite(r["teacher_kl"]) for r in records)
    assert _changed(saved_model, out / "final")


def test_every_config_field_is_a_flag():
    parser = build_parser()
    for algorithm, config_class in (("dpo", DPOConfig), ("ppo", PPOConfig)):
        base = ["train", algorithm, "--model", "m", "--data", "d"]
        defaults = vars(parser.parse_args(base))
        for name, value in vars(config_class()).items():
            assert defaults[name] == value, name
    args = parser.parse_args(["train", "ppo", "--model", "m", "--data", "d", "--top-p", "0.9",
                              "--clip-eps-high", "none", "--dual-clip", "3",
                              "--use-fused-linear", "--no-whiten-advantages"])
    assert (args.top_p, args.clip_eps_high, args.dual_clip) == (0.9, None, 3.0)
    assert args.use_fused_linear is True and args.whiten_advantages is False


@pytest.mark.parametrize("flags, field", [
    (["--lr", "-1"], "DPOConfig.lr"),
    (["--beta", "0"], "DPOConfig.beta"),
    (["--loss-type", "nope"], "DPOConfig.loss_type"),
    (["--loss-type", "sigmoid", "sft", "--loss-weights", "1"], "DPOConfig.loss_weights"),
    (["--loss-type", "orpo", "ipo"], "DPOConfig.loss_type"),
    (["--loss-type", "orpo", "--rpo-alpha", "1"], "DPOConfig.rpo_alpha"),
    (["--loss-type", "cpo", "--cpo-loss-type", "simpo"], "DPOConfig.cpo_loss_type"),
    (["--cpo-loss-type", "hinge"], "DPOConfig.cpo_loss_type"),  # read by cpo alone
    (["--loss-type", "cpo", "--cpo-loss-type", "ipo", "--label-smoothing", "0.1"],
     "DPOConfig.label_smoothing"),
])
def test_bad_flags_are_usage_errors_naming_the_field(flags, field, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "dpo", "--model", "unused", "--data", "unused", *flags])
    assert exit_info.value.code == 2
    assert field in capsys.readouterr().err


@pytest.mark.parametrize("algorithm", ["dpo", "ppo"])
def test_a_fresh_run_into_a_folder_with_checkpoints_is_a_usage_error(algorithm, tmp_path,
                                                                     capsys):
    """Refused before loading anything: the model path here does not exist."""
    (tmp_path / "checkpoint-3").mkdir()
    reward = ["--reward-fn", "rlhf_fast.demo:kindness_reward"] if algorithm == "ppo" else []
    with pytest.raises(SystemExit) as exit_info:
        main(["train", algorithm, "--model", "no/such/model", "--data", "unused", *reward,
              "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "already holds 1 checkpoint(s)" in error and "pass resume_from" in error


@pytest.mark.parametrize("algorithm, lines, message", [
    ("dpo", [], "--data {path}: records is empty"),
    ("dpo", ['{"prompt": "p", "chosen": "c"}'],
     "--data {path}: records[0] needs a string field 'rejected', got None"),
    ("dpo", ["not json"], "--data {path}: records: {path} line 1 is not JSON"),
    ("ppo", [], "--data {path}: prompts is empty"),
])
def test_bad_data_is_a_usage_error_naming_the_flag(algorithm, lines, message, tmp_path,
                                                   capsys):
    """Read before any model is loaded: the model path here does not exist."""
    path = tmp_path / ("data.jsonl" if algorithm == "dpo" else "prompts.txt")
    path.write_text("".join(line + "\n" for line in lines))
    reward = ["--reward-fn", "rlhf_fast.demo:kindness_reward"] if algorithm == "ppo" else []
    with pytest.raises(SystemExit) as exit_info:
        main(["train", algorithm, "--model", "no/such/model", "--data", str(path), *reward,
              "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message.format(path=path) in capsys.readouterr().err


def test_a_missing_eval_data_file_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "dpo", "--model", "no/such/model",
              "--data", str(DATA / "preferences_train.jsonl"),
              "--eval-data", str(tmp_path / "missing.jsonl"),
              "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--eval-data" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [
    *[("--model", value) for value in ("./my-sft", "../my-sft", "no/such/model",
                                       "~/no-such-rlhf-fast-model", "{tmp}/missing")],
    *[(flag, "./my-rm") for flag in ("--tokenizer", "--ref-model", "--reward-model",
                                     "--value-model")],
])
def test_a_missing_local_model_is_a_usage_error_naming_the_flag(flag, value, saved_model,
                                                                tmp_path, capsys):
    """Not Hugging Face's "Repo id must ..." once other models have loaded: a usage
    error naming the flag, before any model loads."""
    value = value.format(tmp=tmp_path)
    argv = ["train", "ppo", "--model", str(saved_model), "--data", str(DATA / "prompts.txt"),
            "--output-dir", str(tmp_path / "out"), flag, value]  # the last --model wins
    if flag != "--reward-model":
        argv += ["--reward-fn", "rlhf_fast.demo:kindness_reward"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"{flag} {value}: no such file or folder" in capsys.readouterr().err


def test_model_flags_take_existing_paths_and_hub_ids(saved_model, tmp_path, monkeypatch):
    """Hub ids pass the check (they are downloaded when loaded); ~ is expanded."""
    from rlhf_fast.cli_train import check_model_flags

    monkeypatch.setenv("HOME", str(saved_model.parent))
    args = build_parser().parse_args([
        "train", "dpo", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--data", "d",
        "--tokenizer", "gpt2", "--ref-model", f"~/{saved_model.name}"])
    check_model_flags(args, build_parser())
    assert (args.model, args.tokenizer, args.ref_model) == (
        "Qwen/Qwen2.5-0.5B-Instruct", "gpt2", str(saved_model))


@pytest.mark.parametrize("resume_from, message", [
    ("latest", "--resume-from latest: resume_from='latest': no checkpoint-<step> folder in "
               "{out}"),
    ("{out}/checkpoint-3", "--resume-from {out}/checkpoint-3: resume_from: no "
                           "checkpoint folder at {out}/checkpoint-3"),
], ids=["latest", "a-file"])
def test_resuming_without_a_checkpoint_is_a_usage_error(resume_from, message, tmp_path,
                                                         capsys):
    """Refused before loading anything: the model path here does not exist."""
    out = tmp_path / "empty"
    out.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "dpo", "--model", "no/such/model",
              "--data", str(DATA / "preferences_train.jsonl"), "--output-dir", str(out),
              "--resume-from", resume_from.format(out=out)])
    assert exit_info.value.code == 2
    assert message.format(out=out) in capsys.readouterr().err


@pytest.mark.parametrize("algorithm, flag, data", [
    ("dpo", "--batch-size", "preferences_train.jsonl"),
    ("ppo", "--rollout-batch-size", "prompts.txt"),
])
def test_a_batch_larger_than_the_data_is_a_usage_error(algorithm, flag, data, tmp_path,
                                                       capsys):
    """Refused before loading anything: the model path here does not exist."""
    reward = ["--reward-fn", "rlhf_fast.demo:kindness_reward"] if algorithm == "ppo" else []
    with pytest.raises(SystemExit) as exit_info:
        main(["train", algorithm, "--model", "no/such/model", "--data", str(DATA / data),
              *reward, "--output-dir", str(tmp_path), flag, "100000"])
    assert exit_info.value.code == 2
    assert f"{flag} 100000 is more than the " in capsys.readouterr().err


def test_cli_weighs_reward_models_before_reward_functions(saved_model, tmp_path,
                                                         torch_backend, monkeypatch):
    """The README's order: --reward-weights weigh the --reward-model ones first, then the
    --reward-fn ones, wherever the flags stand on the command line."""
    from transformers import AutoTokenizer

    from rlhf_fast.trainers import PPOTrainer

    (tmp_path / "rewards.py").write_text("def length(prompts, answers):\n"
                                         "    return [len(a) + 1.0 for a in answers]\n")
    tokenizer = AutoTokenizer.from_pretrained(saved_model)
    sequence_classifier(tokenizer, 6).save_pretrained(tmp_path / "rm")
    seen = {}

    def first_rollout(trainer):  # instead of training: the first rollout's scores
        seen["trainer"], seen["rollout"] = trainer, trainer.rollout(0)
        return []

    monkeypatch.setattr(PPOTrainer, "train", first_rollout)
    main(["train", "ppo", "--model", str(saved_model), "--data", str(DATA / "prompts.txt"),
          "--reward-fn", f"{tmp_path / 'rewards.py'}:length", "--reward-model",
          str(tmp_path / "rm"), "--reward-weights", "2", "0.5", "--output-dir",
          str(tmp_path / "out"), "--device", "cpu", "--rollout-batch-size", "2",
          "--max-new-tokens", "4", "--max-steps", "1"])
    trainer, rollout = seen["trainer"], seen["rollout"]
    rewards = trainer.sampler.rewards
    assert rewards[0].name == "the reward model"
    assert rewards[1].name.endswith(".length")
    assert trainer.reward_weights.tolist() == [2.0, 0.5]
    answers = tokenizer.batch_decode(rollout.sequences[:, rollout.prompt_width:],
                                     skip_special_tokens=True)
    assert rollout.reward_columns[:, 1].tolist() == [len(a) + 1.0 for a in answers]
    torch.testing.assert_close(rollout.scores, rollout.reward_columns @ torch.tensor([2.0, 0.5]))


def test_ppo_needs_a_reward(saved_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "ppo", "--model", str(saved_model), "--data", str(DATA / "prompts.txt"),
              "--output-dir", str(tmp_path)])
    assert "--reward-model or --reward-fn" in capsys.readouterr().err


DDP_SCRIPT = """
import json, os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from rlhf_fast.trainers import DPOConfig, DPOTrainer
model_dir, data, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer=tokenizer,
                     train_dataset=data,
                     config=DPOConfig(output_dir=out, lr=1e-3, batch_size=batch, max_steps=2,
                                      max_length=40, max_prompt_length=16, device="cpu",
                                      max_grad_norm=0.0, seed=5))
trainer.train()
torch.save(trainer.model.state_dict(), os.path.join(out, f"rank{trainer.run.rank}.pt"))
"""


def test_dpo_under_ddp_matches_one_process_with_the_global_batch(saved_model, tmp_path):
    """Two gloo processes with 2 pairs each take the same steps as one process with 4."""
    script = tmp_path / "ddp_dpo.py"
    script.write_text(DDP_SCRIPT)
    data = str(DATA / "preferences_train.jsonl")
    port = 29500 + os.getpid() % 1000
    run_ranks(script, [str(saved_model), data, str(tmp_path / "ddp"), "2"], 2, port)
    run_ranks(script, [str(saved_model), data, str(tmp_path / "single"), "4"], 1, port + 1)
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    initial = AutoModelForCausalLM.from_pretrained(saved_model).state_dict()
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(single[n], initial[n]) for n in single)
    logged = _lines(tmp_path / "ddp" / "metrics.jsonl")
    alone = _lines(tmp_path / "single" / "metrics.jsonl")
    assert logged[-1]["loss"] == pytest.approx(alone[-1]["loss"], rel=1e-4)


PPO_DDP_RESUME_SCRIPT = """
import os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from rlhf_fast.trainers import PPOConfig, PPOTrainer
model_dir, prompts, out = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(model_dir)

def train(name, max_steps, resume_from=None):
    config = PPOConfig(output_dir=os.path.join(out, name), advantage_estimator="grpo",
                       group_size=2, max_steps=max_steps, rollout_batch_size=2,
                       mini_batch_size=4, ppo_epochs=1, max_new_tokens=6, lr=1e-3,
                       # the 1-step run stands for a cut 2-step one: a schedule that
                       # does not depend on max_steps (linear's decay does)
                       lr_scheduler_type="constant",
                       save_steps=1, seed=7, resume_from=resume_from, device="cpu")
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = PPOTrainer(policy, tokenizer=tokenizer, prompts=prompts, config=config,
                         reward_fn_or_model=lambda p, answers: [len(a) / 10 for a in answers])
    trainer.train()
    torch.save(policy.state_dict(), os.path.join(out, name, f"rank{trainer.run.rank}.pt"))

train("a", 2)
train("b", 1)
train("b", 2, "latest")
"""


def test_ppo_resume_under_ddp_restores_each_ranks_random_streams(saved_model, tmp_path):
    """Two gloo processes: 2 iterations equal 1 + resume + 1. Each process samples with
    its own random streams (seed + rank: the same noise on every rank would correlate
    their answers), and the checkpoint keeps every rank's, not only rank 0's."""
    script = tmp_path / "ddp_ppo_resume.py"
    script.write_text(PPO_DDP_RESUME_SCRIPT)
    port = 29500 + (os.getpid() + 500) % 1000
    run_ranks(script, [str(saved_model), str(DATA / "prompts.txt"), str(tmp_path)], 2, port)

    rng = [torch.load(tmp_path / "b" / "checkpoint-1" / f"rng_state_{rank}.pth",
                      weights_only=True) for rank in (0, 1)]
    assert isinstance(rng, list) and len(rng) == 2
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])
    for rank in (0, 1):
        a = torch.load(tmp_path / "a" / f"rank{rank}.pt")
        b = torch.load(tmp_path / "b" / f"rank{rank}.pt")
        assert all(torch.equal(a[name], b[name]) for name in a), rank

    def logged(run):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"}
                for r in _lines(tmp_path / run / "metrics.jsonl")]

    assert [r["step"] for r in logged("a")] == [1, 2]
    assert logged("a") == logged("b")


def test_plot_curves_writes_a_png_or_says_why_not(tmp_path, monkeypatch, capsys):
    from rlhf_fast.trainers.metrics import plot_curves

    records = [{"step": s, "loss": 1.0 / s, "reward": 0.1 * s} for s in range(1, 6)]
    path = plot_curves(records, ["loss", "reward", "absent"], tmp_path / "curves.png", "t")
    assert path == tmp_path / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert plot_curves(records, ["loss"], tmp_path / "again.png", "t") is None
    assert not (tmp_path / "again.png").exists()
    assert "plot skipped: matplotlib is not installed" in capsys.readouterr().out


def test_load_source_from_a_list_a_jsonl_file_and_a_dataset_like(tmp_path):
    from rlhf_fast.trainers.sources import load_source

    def load_records(data, fields, name):
        return load_source(data, "pairs", name).to_list()

    records = [{"prompt": "p1", "chosen": "a", "rejected": "b"},
               {"prompt": "p2", "chosen": "c", "rejected": "d"}]
    fields = ("prompt", "chosen", "rejected")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n\n" for r in records))  # blank lines skipped
    assert load_records(path, fields, "data") == records
    assert load_records(str(path), fields, "data") == records

    class DatasetLike:  # what the trainers use of a datasets.Dataset
        column_names = list(fields)

        def __len__(self):
            return len(records)

        def __getitem__(self, index):
            return records[index]

    assert load_records(DatasetLike(), fields, "data") == records
    path.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="data: .* line 2 is not JSON"):
        load_records(path, fields, "data")
    with pytest.raises(ValueError, match=r"data\[0\] must be a dict"):
        load_records(["just a string"], fields, "data")
