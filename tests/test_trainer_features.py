"""The trainers' TRL-style features on tiny local models: LR schedules, trackers
(report_to), PPO's gradient accumulation and evaluation, LoRA adapters, TRL's reward
function signature, and the generation hook.
"""

import json
import sys
import types

import pytest
import torch

from rlhf_fast import demo
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer

TRAIN = demo.DATA / "preferences_train.jsonl"
PROMPTS = demo.DATA / "prompts.txt"
LR = 1e-3


@pytest.fixture(scope="module")
def tokenizer():
    corpus = demo.read_jsonl(demo.DATA / "corpus.jsonl")
    return demo.train_tokenizer([r["prompt"] for r in corpus]
                                + [r["completion"] for r in corpus])


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")


def tiny_dpo(tokenizer, directory, model=None, **options):
    """A DPOTrainer on 8 pairs, batches of 4, a tiny Llama."""
    records = [json.loads(line) for line in TRAIN.read_text().splitlines()[:8]]
    config = DPOConfig(output_dir=str(directory), batch_size=4, lr=LR, max_length=40,
                       max_prompt_length=16, seed=5, device="cpu", logging_steps=1,
                       **options)
    model = demo.tiny_llama(tokenizer, hidden_size=32, seed=2) if model is None else model
    return DPOTrainer(model, tokenizer=tokenizer, train_dataset=records, config=config)


def length_reward(prompts, answers):
    return [len(a) / 10 for a in answers]


def tiny_ppo(tokenizer, directory, model=None, reward=length_reward, **options):
    """A GRPO PPOTrainer: 2 prompts x 2 answers of at most 4 tokens, a tiny Llama."""
    options = dict(advantage_estimator="grpo", group_size=2, rollout_batch_size=2,
                   mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, lr=LR, seed=7,
                   device="cpu") | options
    config = PPOConfig(output_dir=str(directory), **options)
    model = demo.tiny_llama(tokenizer, hidden_size=32, seed=3) if model is None else model
    return PPOTrainer(model, tokenizer=tokenizer, prompts=PROMPTS, reward_fn_or_model=reward,
                      config=config)


def training_rows(log):
    """The logged training rows without the wall-clock throughput."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log
            if not any(k.startswith("eval/") for k in r)]


# --- 1. the learning-rate schedule -----------------------------------------------------------


def expected_lrs(name, steps, warmup):
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup,
                              num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup"])
def test_dpo_lr_follows_transformers_schedule_with_a_warmup_ratio(tokenizer, tmp_path, name):
    log = tiny_dpo(tokenizer, tmp_path, max_steps=4, lr_scheduler_type=name,
                   warmup_ratio=0.25).train()
    assert [r["lr"] for r in log] == pytest.approx(expected_lrs(name, 4, 1), abs=1e-6)


def test_ppo_schedule_spans_every_optimizer_step_of_the_run(tokenizer, tmp_path):
    """8 rows in minibatches of 2, accumulated 2 by 2: 2 optimizer steps per epoch."""
    trainer = tiny_ppo(tokenizer, tmp_path, max_steps=3, rollout_batch_size=4,
                       mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=3)
    assert trainer.loop.training_steps == 3 * 3 * 2
    assert trainer.config.optimizer_steps_per_iteration == 6


@pytest.mark.parametrize("options, message", [
    (dict(lr_scheduler_type="cosine_decay"), "DPOConfig.lr_scheduler_type must be one of"),
    (dict(lr_scheduler_type="reduce_lr_on_plateau"), "DPOConfig.lr_scheduler_type"),
    (dict(warmup_ratio=1.5), "DPOConfig.warmup_ratio must be a float in [0, 1)"),
    (dict(warmup_ratio=0.1, warmup_steps=3), "DPOConfig.warmup_ratio must be 0 when"),
    (dict(report_to="mlflow"), "DPOConfig.report_to must be one of"),
])
def test_bad_schedule_or_tracker_names_the_field(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        DPOConfig(**options)


# --- 2. trackers ----------------------------------------------------------------------------


def test_a_tracker_without_its_package_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    with pytest.raises(ValueError, match="PPOConfig.report_to .*'wandb' needs the 'wandb' "
                                         "package"):
        PPOConfig(report_to=["tensorboard", "wandb"])


def fake_tracker_module(name):
    """A module with init / log / finish that records its calls."""
    module = types.ModuleType(name)
    module.calls = []
    module.init = lambda **kwargs: module.calls.append(("init", kwargs))
    module.log = lambda metrics, step=None: module.calls.append(("log", step, metrics))
    module.finish = lambda: module.calls.append(("finish",))
    return module


def test_wandb_and_trackio_get_every_logged_row(tokenizer, tmp_path, monkeypatch):
    fakes = {name: fake_tracker_module(name) for name in ("wandb", "trackio")}
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    log = tiny_dpo(tokenizer, tmp_path, max_steps=2, report_to=["wandb", "trackio"]).train()
    for module in fakes.values():
        (init, first), *logs, finish = module.calls
        assert init == "init" and first["project"] == "rlhf-fast"
        assert first["config"]["max_steps"] == 2
        assert finish == ("finish",)
        assert [(step, pytest.approx(m, abs=1e-6)) for _, step, m in logs] == \
            [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in log]


def test_tensorboard_gets_every_logged_row(tokenizer, tmp_path):
    pytest.importorskip("tensorboard", reason="report_to='tensorboard' needs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = tiny_ppo(tokenizer, tmp_path, max_steps=2, report_to="tensorboard").train()
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    rewards = [(e.step, e.value) for e in events.Scalars("reward")]
    assert rewards == [(r["step"], pytest.approx(r["reward"], abs=1e-6)) for r in log]
    assert (tmp_path / "metrics.jsonl").is_file()  # the JSONL log stays
