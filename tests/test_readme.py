"""The README's snippets run as printed, and CI runs the README's test command."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlhf_fast
from helpers import rel_err

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_api_tour_snippets_run_and_hold_what_they_claim():
    blocks = python_blocks()
    assert len(blocks) >= 3
    logprobs_ns: dict = {}
    exec(blocks[0], logprobs_ns)
    assert logprobs_ns["logp"].shape == (2, 16) and logprobs_ns["logp"].dtype == torch.float32
    assert logprobs_ns["logits"].grad.dtype == torch.bfloat16
    grad = logprobs_ns["logits"].grad
    assert (grad[:, :3] == 0).all() and (grad[:, -1] == 0).all()  # ignored, unused
    assert (grad[:, 3:-1] != 0).any(dim=-1).all()
    ppo_ns: dict = {}
    exec(blocks[1], ppo_ns)
    assert ppo_ns["logp"].grad is not None and ppo_ns["values"].grad is not None
    assert not ppo_ns["logp"].grad[~ppo_ns["mask"]].any()
    assert ppo_ns["gspo"].rollout_is_mean > 0 and ppo_ns["gspo"].policy_loss.isfinite()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    test_command = next(c.strip() for c in commands if "pytest" in c and "pip install" in c)
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci_script.splitlines()


def test_advantages_snippet_runs():
    ns: dict = {}
    exec(python_blocks()[2], ns)
    assert (ns["advantages"][1, :5] == 0).all()
    valid = ns["advantages"][ns["mask"]]
    assert abs(valid.mean().item()) < 1e-5 and abs(valid.std().item() - 1) < 1e-3
    assert ns["group_adv"].view(2, 4).sum(-1).abs().max().item() < 1e-5
    # every token of an answer has the score as its return; the baseline is the group's
    # path-variance-weighted mean of it
    assert torch.equal(ns["otb_returns"], ns["scores"][:, None].expand(8, 32))
    expected = rlhf_fast.reference.optimal_token_baseline(
        ns["outcome"], ns["answer_mask"], ns["old_logp"], ns["log_sum_p2"], 4)[0]
    assert rel_err(ns["otb_adv"], expected) < 1e-5


def test_dpo_snippet_runs_and_holds_what_it_claims():
    ns: dict = {}
    exec(python_blocks()[3], ns)
    out, grad, labels = ns["out"], ns["logits"].grad, ns["labels"]
    assert out.loss.dim() == 0 and out.chosen_rewards.shape == (2,)
    assert 0.0 <= out.reward_accuracy.item() <= 1.0
    assert grad.dtype == torch.bfloat16
    # Positions whose next token is masked get no gradient; every answer token does.
    next_masked = torch.cat([labels[:, 1:] == -100, torch.ones(4, 1, dtype=torch.bool)], 1)
    assert not grad[next_masked].any()
    assert (grad[~next_masked] != 0).any(dim=-1).all()
    seq, lengths = ns["seq"].detach(), ns["lengths"]
    simpo = rlhf_fast.reference.simpo_loss(seq[:2], seq[2:], lengths[:2], lengths[2:],
                                           beta=2.0, gamma=1.0)
    assert rel_err(ns["simpo"].loss, simpo.loss) < 1e-5
    pol, ref = ns["pol"], ns["ref"]
    expected = rlhf_fast.reference.dpo_loss(
        pol.chosen, pol.rejected, ref.chosen, ref.rejected, weights=pol.weights,
        chosen_lengths=pol.chosen_lengths, sft_logps=pol.sft_logps, rpo_alpha=0.5)
    assert rel_err(ns["ld"].loss, expected.loss) < 1e-5
    # pair 1's rejected answer is the longer: LD-DPO down-weights its tail
    plain = rlhf_fast.sequence_logps(ns["logp"][2:], ns["mask"][2:])
    assert pol.rejected[0] == plain[0] and pol.rejected[1] > plain[1]


def test_hidden_state_snippet_runs():
    ns: dict = {}
    exec(python_blocks()[4], ns)
    assert ns["logp"].shape == (2, 16) and ns["entropy"].shape == (2, 16)
    assert ns["hidden"].grad is not None and ns["hidden"].grad.abs().sum() > 0
    assert ns["lm_head"].weight.grad.abs().sum() > 0


def test_trainers_snippet_runs(tmp_path, monkeypatch):
    """The trainers snippet, on the reference ops (the kernels in the trainers are
    covered by test_trainers.py), writing under a scratch directory."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(python_blocks()[7], ns)
    assert [r["step"] for r in ns["dpo_metrics"]] == [2, 4]
    assert [r["step"] for r in ns["ppo_metrics"]] == [1, 2]
    assert (tmp_path / "runs/readme/dpo/final/config.json").is_file()
    assert (tmp_path / "runs/readme/ppo/checkpoint-2/model.safetensors").is_file()
    assert all(0 <= r["reward"] <= 1 for r in ns["ppo_metrics"])


def test_compile_snippet_runs_without_a_graph_break():
    torch._dynamo.reset()
    ns: dict = {}
    exec(python_blocks()[6], ns)
    assert ns["explained"].graph_break_count == 0 and ns["explained"].graph_count == 1
    assert ns["weight"].grad is not None and ns["weight"].grad.abs().sum() > 0


def test_distillation_snippet_runs_and_holds_what_it_claims():
    ns: dict = {}
    exec(python_blocks()[5], ns)
    grad, labels = ns["student_logits"].grad, ns["labels"]
    assert grad.dtype == torch.bfloat16 and ns["loss"].item() > 0
    assert not grad[labels == -100].any() and grad[labels != -100].any(dim=-1).all()


def test_trl_snippet_patches_and_unpatches():
    from trl.trainer import utils

    original = utils._ChunkedLogProbFunction
    ns: dict = {}
    exec(next(b for b in python_blocks() if "patch_trl()" in b), ns)
    assert utils._ChunkedLogProbFunction is original
    ns["rlhf_trl"].patch_trl()
    try:
        assert utils._ChunkedLogProbFunction is ns["rlhf_trl"].RlhfFastLogProbFunction
    finally:
        ns["rlhf_trl"].unpatch_trl()


# --- "A TRL user's round trip": its shell blocks and snippet, as printed -------------------

ROUND_TRIP = "## A TRL user's round trip"
#: the hub model the section names; the test runs it on a tiny local one instead
README_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def section(title: str) -> str:
    start = README.index(title + "\n")
    end = README.find("\n## ", start + len(title))
    return README[start:end if end != -1 else None]


def tiny_chat_model(folder: Path) -> Path:
    """A tiny Llama and its tokenizer, with a small chat template, saved as a local
    model folder (what the section's hub model stands for)."""
    from rlhf_fast.demo import DATA, read_jsonl, tiny_llama, train_tokenizer

    corpus = read_jsonl(DATA / "corpus.jsonl")
    tokenizer = train_tokenizer([r["prompt"] for r in corpus]
                                + [r["completion"] for r in corpus])
    tokenizer.chat_template = CHAT_TEMPLATE
    tiny_llama(tokenizer, hidden_size=32, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_shell_block(block: str, cwd: Path) -> None:
    """A bash block, with `rlhf-fast` this checkout's CLI (python -m rlhf_fast.cli),
    offline, on the reference ops (the kernels' trainers: test_trainers.py)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), RLHF_FAST_BACKEND="torch",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(cwd / "hf-cache"), TOKENIZERS_PARALLELISM="false")
    script = (f'set -euo pipefail\nrlhf-fast() {{ "{sys.executable}" -m rlhf_fast.cli '
              f'"$@"; }}\n{block}')
    proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_trl_round_trip_runs_as_printed(tmp_path, monkeypatch):
    """The section's DPO run (config file, chat pairs, LoRA, TensorBoard, checkpoints),
    its from_pretrained snippet and its GRPO run with two TRL reward functions."""
    peft = pytest.importorskip("peft", reason="the LoRA run needs peft")
    pytest.importorskip("tensorboard", reason="report_to: tensorboard needs tensorboard")
    from safetensors.torch import load_file

    text = section(ROUND_TRIP)
    model = str(tiny_chat_model(tmp_path / "tiny-chat"))
    shell = [b.replace(README_MODEL, model)
             for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]
    snippets = [b.replace(README_MODEL, model)
                for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)]
    assert len(shell) == 2 and len(snippets) == 1
    work = tmp_path / "work"
    work.mkdir()

    # (a) DPO from dpo.yaml on conversational pairs: a LoRA adapter in every checkpoint
    run_shell_block(shell[0], work)
    out = work / "dpo-out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # max_steps, logging
    assert rows[0]["lr"] == pytest.approx(5e-5)  # learning_rate, a TRL name
    for folder in (out / "checkpoint-2", out / "checkpoint-4", out / "final"):
        assert (folder / "adapter_model.safetensors").is_file(), folder
        assert not (folder / "model.safetensors").exists(), folder
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["lora_alpha"] == 16
        assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2",
                                                                 "checkpoint-4"]
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # report_to: tensorboard

    # (b) the snippet: checkpoint-2's adapter onto the base, final/ merged into it
    monkeypatch.chdir(work)
    ns: dict = {}
    exec(snippets[0], ns)
    saved = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    loaded = peft.get_peft_model_state_dict(ns["model"])
    assert saved.keys() == loaded.keys() and saved
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert any("lora_B" in k and saved[k].abs().sum() > 0 for k in saved)  # it trained
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(work / "dpo-merged").state_dict()
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)

    # (c) GRPO with rewards.py's two TRL-style functions, weighted
    run_shell_block(shell[1], work)
    rows = [json.loads(line) for line in
            (work / "grpo-out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(isinstance(r["reward"], float) and -1.0 <= r["reward"] <= 0.5 for r in rows)
    assert (work / "grpo-out" / "final" / "model.safetensors").is_file()
