"""The trainers' TRL-style features on tiny local models: LR schedules, trackers
(report_to), PPO's gradient accumulation and evaluation, LoRA adapters, TRL's reward
function signature, and the generation hook.
"""

import copy
import dataclasses
import importlib.machinery
import json
import math
import re
import sys
import types

import pytest
import torch

from helpers import sequence_classifier
from rlhf_fast import demo
from rlhf_fast.trainers.dpo import DPOTrainer
from rlhf_fast.trainers.dpo_config import DPOConfig
from rlhf_fast.trainers.generation import Generation
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


def tiny_ppo(tokenizer, directory, model=None, reward=length_reward, generate_fn=None,
             **options):
    """A GRPO PPOTrainer: 2 prompts x 2 answers of at most 4 tokens, a tiny Llama."""
    options = dict(advantage_estimator="grpo", group_size=2, rollout_batch_size=2,
                   mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, lr=LR, seed=7,
                   device="cpu") | options
    config = PPOConfig(output_dir=str(directory), **options)
    model = demo.tiny_llama(tokenizer, hidden_size=32, seed=3) if model is None else model
    return PPOTrainer(model, tokenizer=tokenizer, prompts=PROMPTS, reward_fn_or_model=reward,
                      config=config, generate_fn=generate_fn)


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
    """A module with init / log / finish that records its calls (and a spec: a lazy
    import's importlib.util.find_spec(name), accelerate's, raises on a module without)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
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
        assert [(step, pytest.approx(m, abs=1e-6)) for _, step, m in logs] == logged_rows(log)


def logged_rows(log):
    """(step, the row's other metrics) of each row a run logged."""
    return [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in log]


def wandb_history(run_file):
    """(step, metrics) of each history record of an offline wandb run's .wandb file: a
    LevelDB-style log (a 7-byte ":W&B" header, then in 32 KiB blocks records of a CRC,
    a little-endian length and a chunk type, FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4) of
    wandb's protobuf Records. wandb has no public reader of offline runs."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending, rows = 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's zero-filled tail
            position += block - position % block
            continue
        length = int.from_bytes(data[position + 4:position + 6], "little")
        kind, chunk = data[position + 6], data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0:  # padding
            continue
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                rows.append((record.history.step.num,
                             {k: v for k, v in items.items() if not k.startswith("_")}))
    return rows


def test_a_real_offline_wandb_run_holds_every_logged_row(tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="report_to='wandb' with the real package needs wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = tiny_dpo(tokenizer, tmp_path / "out", max_steps=2, report_to="wandb").train()
    run_file, = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert [(step, pytest.approx(m, abs=1e-6)) for step, m in wandb_history(run_file)] == \
        logged_rows(log)


def test_a_real_local_trackio_run_holds_every_logged_row(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read on import
    pytest.importorskip("trackio", reason="report_to='trackio' with the real package needs "
                                          "trackio")
    from trackio import sqlite_storage

    # (were trackio imported before this test, its folder would be another's)
    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", tmp_path / "trackio")
    log = tiny_dpo(tokenizer, tmp_path / "out", max_steps=2, report_to="trackio").train()
    rows = sqlite_storage.SQLiteStorage.get_logs(project="rlhf-fast", run="out")
    assert [(r["step"], pytest.approx({k: r[k] for k in log[0] if k != "step"}, abs=1e-6))
            for r in rows] == logged_rows(log)


def test_tensorboard_gets_every_logged_row(tokenizer, tmp_path):
    pytest.importorskip("tensorboard", reason="report_to='tensorboard' needs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = tiny_ppo(tokenizer, tmp_path, max_steps=2, report_to="tensorboard").train()
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    rewards = [(e.step, e.value) for e in events.Scalars("reward")]
    assert rewards == [(r["step"], pytest.approx(r["reward"], abs=1e-6)) for r in log]
    assert (tmp_path / "metrics.jsonl").is_file()  # the JSONL log stays


# --- 3. PPO: gradient accumulation and evaluation --------------------------------------------


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_accumulating_k_minibatches_of_b_steps_as_one_of_k_times_b(tokenizer, tmp_path, agg):
    """One iteration, one epoch over 8 rows: minibatches of 2 accumulated 4 by 4 (with
    minibatches of unequal token counts) give the weights of one step on all 8 rows."""
    initial = demo.tiny_llama(tokenizer, hidden_size=32, seed=3)
    weights = []
    for name, mini_batch_size, accumulation in (("one", 8, 1), ("accumulated", 2, 4)):
        policy = copy.deepcopy(initial)
        tiny_ppo(tokenizer, tmp_path / name, policy, max_steps=1, rollout_batch_size=4,
                 mini_batch_size=mini_batch_size, gradient_accumulation_steps=accumulation,
                 max_new_tokens=6, agg=agg, lr_scheduler_type="constant",
                 max_grad_norm=0.0).train()
        weights.append({k: v.detach().clone() for k, v in policy.named_parameters()})
    moved = [k for k in weights[0] if not torch.equal(weights[0][k], initial.state_dict()[k])]
    assert moved
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-6)


def test_ppo_evaluation_logs_eval_reward_and_leaves_the_training_as_it_was(tokenizer, tmp_path):
    initial = demo.tiny_llama(tokenizer, hidden_size=32, seed=3)
    eval_prompts = PROMPTS.read_text().splitlines()[:3]
    logs = []
    for name, options in (("plain", {}), ("greedy", dict(eval_steps=1)),
                          ("sampled", dict(eval_steps=2, eval_do_sample=True))):
        config = PPOConfig(output_dir=str(tmp_path / name), advantage_estimator="grpo",
                           group_size=2, rollout_batch_size=2, mini_batch_size=4,
                           ppo_epochs=1, max_new_tokens=4, lr=LR, seed=7, device="cpu",
                           max_steps=3, **options)
        trainer = PPOTrainer(copy.deepcopy(initial), tokenizer=tokenizer, prompts=PROMPTS,
                             reward_fn_or_model=length_reward, config=config,
                             eval_prompts=None if name == "plain" else eval_prompts)
        logs.append(trainer.train())
    plain, greedy, sampled = logs
    assert training_rows(greedy) == training_rows(plain) == training_rows(sampled)
    assert [r["step"] for r in greedy if "eval/reward" in r] == [1, 2, 3]
    assert [r["step"] for r in sampled if "eval/reward" in r] == [2, 3]
    assert all(r["eval/reward"] >= 0 for r in greedy + sampled if "eval/reward" in r)


# --- 5. rewards: TRL's signature --------------------------------------------------------------


def test_reward_functions_get_trls_keywords_and_dataset_columns(tokenizer, tmp_path):
    calls = []

    def trl_style(prompts, completions, completion_ids, answer, **kwargs):
        calls.append((prompts, completions, completion_ids, answer))
        return [None if i == 0 else float(len(c)) for i, c in enumerate(completions)]

    def positional(prompts, answers):
        return [1.0] * len(answers)

    prompts = [{"prompt": p, "answer": f"a{i}"}
               for i, p in enumerate(PROMPTS.read_text().splitlines()[:4])]
    config = PPOConfig(output_dir=str(tmp_path), advantage_estimator="grpo", group_size=2,
                       rollout_batch_size=2, mini_batch_size=4, ppo_epochs=1,
                       max_new_tokens=4, seed=7, device="cpu", max_steps=1,
                       reward_weights=[1.0, 0.5])
    trainer = PPOTrainer(demo.tiny_llama(tokenizer, hidden_size=32, seed=3),
                         tokenizer=tokenizer, prompts=prompts, config=config,
                         reward_fn_or_model=[trl_style, positional])
    rollout = trainer.rollout(0)
    (given_prompts, completions, completion_ids, answers), = calls
    by_prompt = {r["prompt"]: r["answer"] for r in prompts}
    assert answers == [by_prompt[p] for p in given_prompts]
    assert completions == tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    assert [len(ids) for ids in completion_ids] == rollout.mask.sum(1).int().tolist()
    expected = [0.0] + [float(len(c)) for c in completions[1:]]  # None counts 0
    assert rollout.reward_columns[:, 0].tolist() == expected
    assert rollout.scores.tolist() == pytest.approx([e + 0.5 for e in expected])


def test_reward_models_and_functions_mixed_are_weighed_in_the_order_given(tokenizer,
                                                                          tmp_path):
    """reward_fn_or_model=[function, model, function] with reward_weights: one column per
    source in the list's order (PPOConfig.reward_weights: "in the order given"), the
    model's its score at each answer's last token, and the score their weighted sum."""
    def length(prompts, answers):
        return [float(len(a)) for a in answers]

    def trl_words(completions, **kwargs):
        return [float(len(c.split())) for c in completions]

    reward_model = sequence_classifier(tokenizer, 6)
    weights = [2.0, 0.5, -1.0]
    trainer = tiny_ppo(tokenizer, tmp_path, reward=[length, reward_model, trl_words],
                       reward_weights=weights)
    rollout = trainer.rollout(0)
    answers = tokenizer.batch_decode(rollout.sequences[:, rollout.prompt_width:],
                                     skip_special_tokens=True)
    with torch.no_grad():
        model_scores = reward_model(input_ids=rollout.sequences,
                                    attention_mask=rollout.attention_mask).logits[:, 0]
    expected = torch.stack([torch.tensor(length(None, answers)), model_scores,
                            torch.tensor(trl_words(answers))], 1)
    torch.testing.assert_close(rollout.reward_columns, expected, rtol=1e-5, atol=1e-5)
    assert trainer.reward_weights.tolist() == weights
    torch.testing.assert_close(rollout.scores, expected @ torch.tensor(weights),
                               rtol=1e-5, atol=1e-5)


def test_conversational_prompts_reach_reward_functions_as_trl_passes_them(tokenizer,
                                                                          tmp_path):
    """TRL's signature: the prompt's messages and each completion as one assistant
    message; the plain f(prompts, answers): the prompt as the model saw it (rendered)."""
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    calls = {}

    def trl_style(prompts, completions, **kwargs):
        calls["trl"] = prompts, completions
        return [0.0] * len(prompts)

    def positional(prompts, answers):
        calls["positional"] = prompts, answers
        return [0.0] * len(prompts)

    prompts = [{"prompt": [{"role": "user", "content": p}]}
               for p in PROMPTS.read_text().splitlines()[:4]]
    config = PPOConfig(output_dir=str(tmp_path), advantage_estimator="grpo", group_size=2,
                       rollout_batch_size=2, mini_batch_size=4, ppo_epochs=1,
                       max_new_tokens=4, seed=7, device="cpu", max_steps=1,
                       reward_weights=[1.0, 1.0])
    trainer = PPOTrainer(demo.tiny_llama(chat, hidden_size=32, seed=3), tokenizer=chat,
                         prompts=prompts, config=config,
                         reward_fn_or_model=[trl_style, positional])
    trainer.rollout(0)
    given, completions = calls["trl"]
    rendered, answers = calls["positional"]
    contents = {r["prompt"][0]["content"] for r in prompts}
    assert all(isinstance(p, list) and p[0]["content"] in contents for p in given)
    assert completions == [[{"role": "assistant", "content": a}] for a in answers]
    assert rendered == [chat.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                        for p in given]


# --- 4. LoRA adapters -------------------------------------------------------------------------


def test_dpo_with_lora_trains_the_adapter_against_the_base_model(tokenizer, tmp_path):
    peft = pytest.importorskip("peft", reason="LoRA training needs peft")
    from rlhf_fast.trainers.models import TokenLogprobs

    initial = demo.tiny_llama(tokenizer, hidden_size=32, seed=2)
    base = copy.deepcopy(initial)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"])
    records = [json.loads(line) for line in TRAIN.read_text().splitlines()[:8]]
    config = DPOConfig(output_dir=str(tmp_path), batch_size=4, lr=LR, max_length=40,
                       max_prompt_length=16, seed=5, device="cpu", max_steps=2,
                       lr_scheduler_type="constant")
    trainer = DPOTrainer(initial, tokenizer=tokenizer, train_dataset=records, config=config,
                         peft_config=lora)
    trainer.train()

    # only the adapter trained; the reference is the policy itself, adapter off
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert trainer.reference.model is trainer.model and trainer.reference.adapters_off
    base_weights = trainer.model.get_base_model().state_dict()
    for name, weight in base.state_dict().items():
        adapted = name.replace("proj.", "proj.base_layer.")  # an adapted layer's own weight
        assert torch.equal(base_weights.get(adapted, base_weights.get(name)), weight), name
    assert any(not torch.equal(p, torch.zeros_like(p))
               for n, p in trainer.model.named_parameters() if "lora_B" in n)

    batch = trainer._train_batch(0)
    base_logp = TokenLogprobs(base.eval(), fused_linear=False)
    with torch.no_grad():
        reference = trainer.reference(batch.input_ids, batch.attention_mask)
        policy = TokenLogprobs(trainer.model, fused_linear=False)(batch.input_ids,
                                                                   batch.attention_mask)
        torch.testing.assert_close(reference, base_logp(batch.input_ids, batch.attention_mask))
    assert not torch.allclose(policy, reference)  # the adapter changed the policy
    # the final model is the adapter
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    assert not (tmp_path / "final" / "model.safetensors").exists()


def test_ppo_use_peft_builds_the_lora_adapter_from_the_config_fields(tokenizer, tmp_path):
    pytest.importorskip("peft", reason="LoRA training needs peft")
    trainer = tiny_ppo(tokenizer, tmp_path, max_steps=1, use_peft=True, lora_r=2,
                       lora_target_modules=["q_proj"])
    trainer.train()
    assert trainer.reference.model is trainer.policy
    assert trainer.policy.peft_config["default"].r == 2
    assert all("lora_" in n for n, p in trainer.policy.named_parameters() if p.requires_grad)
    assert (tmp_path / "final" / "adapter_config.json").is_file()


def test_dpo_lora_resume_equals_uninterrupted_run(tokenizer, tmp_path):
    """A LoRA run's checkpoints hold the adapter (peft's save_pretrained): resuming loads
    it back onto the untouched base, and the run goes on as if never cut."""
    peft = pytest.importorskip("peft", reason="LoRA training needs peft")
    initial = demo.tiny_llama(tokenizer, hidden_size=32, seed=2)

    def train(directory, max_steps, resume_from=None):
        # (LoRA's dropout draws from the torch RNG, which the checkpoint restores)
        trainer = tiny_dpo(tokenizer, directory, model=copy.deepcopy(initial),
                           max_steps=max_steps, save_steps=2, use_peft=True, lora_r=4,
                           lora_target_modules=["q_proj", "v_proj"],
                           lr_scheduler_type="constant", resume_from=resume_from)
        return trainer.model, trainer.train()

    model_a, log_a = train(tmp_path / "a", 4)
    cut, log_b = train(tmp_path / "b", 2)
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert (checkpoint / "adapter_config.json").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    # the intermediate checkpoint is a peft adapter folder: from_pretrained on the base
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(initial), checkpoint)
    saved, read = cut.state_dict(), loaded.state_dict()
    assert saved.keys() == read.keys()
    assert all(torch.equal(saved[k], read[k]) for k in saved)
    model_b, log_b = train(tmp_path / "b", 4, str(checkpoint))

    assert training_rows(log_a) == training_rows(log_b)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    lora_b = [k for k in state_a if "lora_B" in k]
    assert lora_b and not all(torch.equal(state_a[k], torch.zeros_like(state_a[k]))
                              for k in lora_b)
    # an adapter of another shape does not fit (the same base: its fingerprint agrees)
    from rlhf_fast.trainers.checkpoints import UnreadableCheckpoint

    with pytest.raises(UnreadableCheckpoint, match="adapter does not fit"), \
            pytest.warns(UserWarning, match="lora_target_modules"):
        tiny_dpo(tokenizer, tmp_path / "b", model=copy.deepcopy(initial), max_steps=4,
                 use_peft=True, lora_r=4, lora_target_modules=["q_proj"],
                 lr_scheduler_type="constant", resume_from=str(checkpoint))
    # the checkpoint does not hold the frozen base: it records it, and refuses another
    other_base = demo.tiny_llama(tokenizer, hidden_size=32, seed=4)
    with pytest.raises(ValueError, match="different reference"):
        tiny_dpo(tokenizer, tmp_path / "b", model=other_base, max_steps=4, use_peft=True,
                 lora_r=4, lora_target_modules=["q_proj", "v_proj"],
                 lr_scheduler_type="constant", resume_from=str(checkpoint))


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_ppo_lora_resume_equals_uninterrupted_run(tokenizer, tmp_path, estimator):
    """The policy's adapter (and the critic, a full model beside it in value_model/)
    come back from a checkpoint under the trained module's actor prefix."""
    pytest.importorskip("peft", reason="LoRA training needs peft")
    initial = demo.tiny_llama(tokenizer, hidden_size=32, seed=3)

    def train(directory, max_steps, resume_from=None):
        trainer = tiny_ppo(tokenizer, directory, model=copy.deepcopy(initial),
                           advantage_estimator=estimator, max_steps=max_steps, save_steps=1,
                           use_peft=True, lora_r=2, lora_target_modules=["q_proj"],
                           lr_scheduler_type="constant", resume_from=resume_from)
        log = trainer.train()
        return [trainer.policy, trainer.value_model], log

    models_a, log_a = train(tmp_path / "a", 2)
    _, log_b = train(tmp_path / "b", 1)
    checkpoint = tmp_path / "b" / "checkpoint-1"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert (checkpoint / "value_model").is_dir() == (estimator == "gae")
    models_b, log_b = train(tmp_path / "b", 2, str(checkpoint))
    assert training_rows(log_a) == training_rows(log_b)
    for model_a, model_b in zip(models_a, models_b):
        if model_a is None:
            continue
        state_a, state_b = model_a.state_dict(), model_b.state_dict()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


# --- 6. the generation hook (generate_fn) -----------------------------------------------------


def generate_hook(model, tokenizer, calls=None):
    """A generate_fn that samples with `model.generate` as the trainer does, drawing from
    torch's global random stream as the trainer's own generate would (so it ignores
    `seed`: reseeding would change every later draw of the run), and returns each
    completion through its first EOS."""
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def generate_fn(prompt_ids, *, max_new_tokens, temperature, top_p, top_k, seed):
        if calls is not None:
            calls.append(dict(prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed))
        width = max(len(p) for p in prompt_ids)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        config = GenerationConfig(do_sample=temperature > 0, temperature=temperature or 1.0,
                                  top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                  eos_token_id=eos, pad_token_id=pad)
        answers = model.generate(input_ids=ids, attention_mask=mask,
                                 generation_config=config)[:, width:].tolist()
        return Generation([a[:a.index(eos) + 1] if eos in a else a for a in answers])

    return generate_fn


def fixed_hook(completions, logprobs=None, calls=None):
    """A generate_fn returning `completions` (and `logprobs`) whatever it is asked."""
    def generate_fn(prompt_ids, **sampling):
        if calls is not None:
            calls.append(dict(prompt_ids=prompt_ids, **sampling))
        return Generation(completions, logprobs)

    return generate_fn


def fixed_completions(tokenizer):
    """4 completions of at most 4 tokens (tiny_ppo's): through EOS, or 4 tokens long."""
    eos = tokenizer.eos_token_id
    a, b, c, d = (tokenizer.encode(w)[0] for w in ("the", "cat", "sat", "on"))
    return [[a, b, eos], [c, d, a, b], [eos], [d, c, b, a]]


def weights_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_a_hook_wrapping_generate_gives_the_run_of_generate(tokenizer, tmp_path):
    """Two iterations with a hook sampling as the trainer's generate (from the same random
    stream): the same logged metrics and final weights as without the hook; the hook gets
    each prompt row unpadded (group_size times), the config's sampling and a seed."""
    initial = demo.tiny_llama(tokenizer, hidden_size=32, seed=3)
    runs, calls = [], []
    for name in ("generate", "hook"):
        policy = copy.deepcopy(initial)
        hook = generate_hook(policy, tokenizer, calls) if name == "hook" else None
        trainer = tiny_ppo(tokenizer, tmp_path / name, policy, max_steps=2, top_p=0.9,
                           temperature=0.7, lr_scheduler_type="constant")
        trainer.generate_fn = hook
        runs.append((training_rows(trainer.train()), weights_of(policy)))
    (log, weights), (hook_log, hook_weights) = runs
    assert hook_log == log and not any(k.startswith("rollout_") for k in log[0])
    for key in weights:
        assert torch.equal(hook_weights[key], weights[key]), key
    assert len(calls) == 2 and calls[0]["seed"] != calls[1]["seed"]
    assert {k: v for k, v in calls[0].items() if k not in ("prompt_ids", "seed")} == dict(
        max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=0)
    prompts = calls[0]["prompt_ids"]
    assert len(prompts) == 4 and prompts[0] == prompts[1] and prompts[2] == prompts[3]
    assert all(p and tokenizer.pad_token_id not in p for p in prompts)


def test_a_hook_with_fixed_completions_is_what_the_trainer_scores(tokenizer, tmp_path):
    completions = fixed_completions(tokenizer)
    seen = []

    def reward(prompts, answers):
        seen.extend(answers)
        return [0.0] * len(answers)

    trainer = tiny_ppo(tokenizer, tmp_path, reward=reward)
    trainer.generate_fn = fixed_hook(completions)
    rollout = trainer.rollout(0)
    answers = rollout.sequences[:, rollout.prompt_width:]
    assert answers.shape == (4, 4) and rollout.rollout_logp is None
    for row, ids in enumerate(completions):
        assert answers[row, :len(ids)].tolist() == ids
        assert rollout.mask[row].tolist() == [1.0] * len(ids) + [0.0] * (4 - len(ids))
        assert rollout.attention_mask[row, rollout.prompt_width:].sum() == len(ids)
    assert seen == tokenizer.batch_decode([ids for ids in completions],
                                          skip_special_tokens=True)


def policy_logprobs(tokenizer, tmp_path, initial, completions):
    """The policy's own log-probs of `completions` at iteration 0 (the rollout's old_logp),
    as a hook returns them: one list per completion."""
    trainer = tiny_ppo(tokenizer, tmp_path / "probe", copy.deepcopy(initial))
    trainer.generate_fn = fixed_hook(completions)
    old_logp = trainer.rollout(0).old_logp
    return [old_logp[row, :len(ids)].tolist() for row, ids in enumerate(completions)]


def one_iteration(tokenizer, directory, initial, hook, **options):
    policy = copy.deepcopy(initial)
    trainer = tiny_ppo(tokenizer, directory, policy, max_steps=1, generate_fn=hook, **options)
    return training_rows(trainer.train())[0], weights_of(policy)


def test_rollout_is_with_the_policys_own_logprobs_changes_nothing(tokenizer, tmp_path):
    """A hook whose log-probs are the policy's: IS weights 1, no mismatch, no rejected
    token, and the update of a run without the correction."""
    initial = demo.tiny_llama(tokenizer, hidden_size=32, seed=3)
    completions = fixed_completions(tokenizer)
    logprobs = policy_logprobs(tokenizer, tmp_path, initial, completions)
    plain, plain_weights = one_iteration(tokenizer, tmp_path / "plain", initial,
                                         fixed_hook(completions))
    row, weights = one_iteration(
        tokenizer, tmp_path / "is", initial, fixed_hook(completions, logprobs),
        rollout_is="token", rollout_rs="token_k1", rollout_rs_threshold="0.5_2.0")
    assert row["rollout_is_mean"] == pytest.approx(1.0, abs=1e-6)
    assert row["rollout_is_max"] == pytest.approx(1.0, abs=1e-6)
    assert abs(row["rollout_kl"]) < 1e-6 and abs(row["rollout_k3_kl"]) < 1e-6
    assert row["rollout_rs_masked_fraction"] == 0.0
    assert {k: v for k, v in row.items() if not k.startswith("rollout_")} == \
        pytest.approx(plain, rel=1e-6, abs=1e-7)
    for key in weights:
        torch.testing.assert_close(weights[key], plain_weights[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("threshold", [2.0, 1.2])
def test_rollout_is_weights_of_shifted_logprobs_follow_the_reference(tokenizer, tmp_path,
                                                                    threshold):
    """Rollout log-probs shifted by -0.3 from the policy's: every token's weight
    pi_old / pi_rollout = e^0.3 before truncation at rollout_is_threshold (the reference's
    rollout_correction), so at the first minibatch (ratio 1) the policy loss is the
    uncorrected one times min(e^0.3, threshold); the k1 / k3 mismatch as the reference's."""
    from rlhf_fast import reference
    from rlhf_fast.options import PPO_OPTIONS

    initial = demo.tiny_llama(tokenizer, hidden_size=32, seed=3)
    completions = fixed_completions(tokenizer)
    logprobs = policy_logprobs(tokenizer, tmp_path, initial, completions)
    shifted = [[v - 0.3 for v in row] for row in logprobs]
    plain, _ = one_iteration(tokenizer, tmp_path / "plain", initial, fixed_hook(completions))
    row, _ = one_iteration(tokenizer, tmp_path / "is", initial,
                           fixed_hook(completions, shifted), rollout_is="token",
                           rollout_is_threshold=threshold)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    old, rollout = torch.zeros(4, 4), torch.zeros(4, 4)
    for r, ids in enumerate(completions):
        mask[r, :len(ids)] = True
        old[r, :len(ids)] = torch.tensor(logprobs[r])
        rollout[r, :len(ids)] = torch.tensor(shifted[r])
    options = types.SimpleNamespace(**PPO_OPTIONS.pick(vars(PPOConfig(
        rollout_is="token", rollout_is_threshold=threshold))))
    weights, _, statistics = reference.rollout_correction(old, rollout, mask, options)
    assert weights[mask] == pytest.approx(min(math.exp(0.3), threshold), rel=1e-5)
    for key, value in statistics.items():
        assert row[key] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    assert row["rollout_is_mean"] == pytest.approx(math.exp(0.3), rel=1e-5)
    assert row["policy_loss"] == pytest.approx(
        min(math.exp(0.3), threshold) * plain["policy_loss"], rel=1e-5)


@pytest.mark.parametrize("options, named", [
    (dict(rollout_is="token"), "rollout_is='token'"),
    (dict(rollout_rs="seq_mean_k3", rollout_rs_threshold=0.5), "rollout_rs='seq_mean_k3'"),
])
def test_rollout_correction_without_logprobs_names_the_option_and_the_hook(
        tokenizer, tmp_path, options, named):
    with pytest.raises(ValueError, match=rf"PPOConfig\.{re.escape(named)} needs the rollout "
                       r"engine's log-probs, but no generate_fn was given"):
        tiny_ppo(tokenizer, tmp_path / "none", **options)
    trainer = tiny_ppo(tokenizer, tmp_path / "hook", generate_fn=fixed_hook(
        fixed_completions(tokenizer)), **options)
    with pytest.raises(ValueError, match=rf"PPOConfig\.{re.escape(named)} .*generate_fn "
                       r".*fixed_hook.*returned logprobs=None"):
        trainer.rollout(0)
    # bypass_mode corrects against the policy's own log-probs, as before: no hook needed
    tiny_ppo(tokenizer, tmp_path / "bypass", policy_loss="bypass_mode", max_steps=1,
             **options).train()


def bad_generations(tokenizer):
    """(what a hook returns, the error it must raise) for 4 prompt rows of tiny_ppo."""
    good = fixed_completions(tokenizer)
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)  # tiny_llama: one row per token
    logprobs = [[-1.0] * len(ids) for ids in good]
    w, x, y, z = good[1]  # ordinary tokens
    return [
        (good, r"a list; expected a rlhf_fast.trainers.generation.Generation"),
        (Generation(good[:3]), r"3 completions; expected one per prompt row \(4\)"),
        (Generation(good[:3] + [[]]),
         r"completion 3 of 0 tokens; expected a list of 1 to max_new_tokens=4"),
        (Generation(good[:3] + [[w, x, y, z, w]]), "completion 3 of 5 tokens"),
        (Generation(good[:3] + [[w, vocab, x, y]]),
         rf"token id {vocab} in completion 3; expected ints in \[0, {vocab}\)"),
        (Generation(good[:3] + [[w, -1, x, y]]), "token id -1 in completion 3"),
        (Generation(good[:3] + [[w, eos, x, y]]), "completion 3 with tokens after its EOS"),
        (Generation(good[:3] + [[w, x]]),
         "completion 3 of 2 tokens without EOS .* or run to max_new_tokens=4"),
        (Generation(good, logprobs[:3]),
         r"logprobs for 3 completions; expected None or one list per completion \(4\)"),
        (Generation(good, logprobs[:1] + [[-1.0]] + logprobs[2:]),
         "1 logprobs for completion 1 of 4 tokens; expected one log-prob per completion"),
        (Generation(good, logprobs[:3] + [[-1.0, math.nan, -1.0, -1.0]]),
         "a non-finite or non-numeric log-prob in completion 3"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_bad_hook_output_names_generate_fn(tokenizer, tmp_path, case):
    output, message = bad_generations(tokenizer)[case]
    trainer = tiny_ppo(tokenizer, tmp_path, generate_fn=lambda prompt_ids, **_: output)
    with pytest.raises(ValueError, match="generate_fn returned " + message):
        trainer.rollout(0)


def test_generate_fn_must_be_callable(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="generate_fn must be None or a callable"):
        tiny_ppo(tokenizer, tmp_path, generate_fn="vllm")


# --- 7. vLLM's offline LLM as the hook (vllm_generate_fn) --------------------------------------


class FakeSamplingParams:
    """vllm.SamplingParams: keeps its keywords."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@dataclasses.dataclass
class FakeLogprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class FakeCompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None  # one {token_id: Logprob} per token


@dataclasses.dataclass
class FakeRequestOutput:  # vllm.outputs.RequestOutput
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    prompt_logprobs: list | None
    outputs: list
    finished: bool = True


class FakeVLLMModel:
    """The in-process model of an LLM built with external_launcher: load_weights takes
    (name, tensor) pairs in the checkpoint's names."""

    def __init__(self, module):
        self.module, self.loads = module, 0

    def load_weights(self, weights):
        self.module.load_state_dict(dict(weights))
        self.loads += 1


class FakeLLM:
    """vllm.LLM on a transformers model: generate samples each request alone with the
    model's generate (top_p 1) and reports, as logprobs_mode="processed_logprobs" does,
    the log-prob after temperature of each sampled token (and of the runner-up, rank 2:
    the adapter must pick the sampled token's)."""

    def __init__(self, model, eos_token_id):
        self.model, self.eos = model.eval(), eos_token_id
        self.inner = FakeVLLMModel(model)
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(
                model_runner=types.SimpleNamespace(model=self.inner))))
        self.calls, self.prefix_resets = [], 0

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        outputs = []
        for number, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            ids = torch.tensor([prompt["prompt_token_ids"]])
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(params.seed)
                sampled = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids),
                    do_sample=params.temperature > 0, temperature=params.temperature or None,
                    top_p=1.0, top_k=0, max_new_tokens=params.max_tokens,
                    eos_token_id=self.eos, pad_token_id=self.eos, output_scores=True,
                    return_dict_in_generate=True)
            tokens = sampled.sequences[0, ids.shape[1]:].tolist()
            steps = []
            for token, scores in zip(tokens, sampled.scores):
                logp = torch.log_softmax(scores[0].float(), -1)
                runner_up = int(logp.topk(2).indices[1 if logp.argmax() == token else 0])
                steps.append({token: FakeLogprob(logp[token].item(), rank=1),
                              runner_up: FakeLogprob(logp[runner_up].item(), rank=2)})
            completion = FakeCompletionOutput(0, "", tokens, None, steps)
            outputs.append(FakeRequestOutput(str(number), None, prompt["prompt_token_ids"],
                                             None, [completion]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_hook_feeds_the_engines_logprobs_to_the_rollout_correction(tokenizer, tmp_path,
                                                                        fake_vllm):
    """Two PPO iterations sampled by a (fake) vLLM engine holding a copy of the policy,
    loaded with the policy's weights before each rollout: its log-probs are the policy's
    own, so the rollout correction weighs every token 1 (no mismatch) at both."""
    from rlhf_fast.trainers.generation import vllm_generate_fn

    policy = demo.tiny_llama(tokenizer, hidden_size=32, seed=3)
    llm = FakeLLM(copy.deepcopy(policy), tokenizer.eos_token_id)
    hook = vllm_generate_fn(llm, eos_token_id=tokenizer.eos_token_id, policy=policy)
    log = tiny_ppo(tokenizer, tmp_path, policy, max_steps=2, generate_fn=hook,
                   temperature=0.7, rollout_is="token", lr_scheduler_type="constant").train()
    assert len(log) == 2 and llm.inner.loads == 2 and llm.prefix_resets == 2
    for row in log:
        assert row["rollout_is_mean"] == pytest.approx(1.0, abs=1e-4)
        assert abs(row["rollout_kl"]) < 1e-4
    assert weights_of(llm.model).keys() == weights_of(policy).keys()
    prompts, params = llm.calls[0]
    assert len(prompts) == len(params) == 4 and prompts[0] == prompts[1]
    assert {k: v for k, v in vars(params[0]).items() if k != "seed"} == dict(
        n=1, max_tokens=4, temperature=0.7, top_p=1.0, top_k=-1,
        stop_token_ids=[tokenizer.eos_token_id], logprobs=0)
    assert len({p.seed for p in params}) == 4  # a group's copies draw different answers


def test_vllm_outputs_become_a_generation_or_a_clear_error():
    from rlhf_fast.trainers.generation import generation_of_vllm_outputs

    def request(tokens, steps):
        return FakeRequestOutput("0", None, [1], None,
                                 [FakeCompletionOutput(0, "", tokens, None, steps)])

    steps = [{5: FakeLogprob(-0.5, 1), 6: FakeLogprob(-1.5, 2)},
             {6: FakeLogprob(-2.0, 3), 7: FakeLogprob(-0.1, 1)}]
    outputs = [request((5, 6), steps), request([7], [{7: FakeLogprob(-0.25, 1)}])]
    assert generation_of_vllm_outputs(outputs, logprobs=True) == Generation(
        [[5, 6], [7]], [[-0.5, -2.0], [-0.25]])
    assert generation_of_vllm_outputs(outputs, logprobs=False) == Generation([[5, 6], [7]])
    with pytest.raises(ValueError, match=r"vLLM returned no log-prob steps for completion 0 "
                                         r"of 2 tokens.*SamplingParams\(logprobs=0\)"):
        generation_of_vllm_outputs([request([5, 6], None)], logprobs=True)
    with pytest.raises(ValueError, match="vLLM returned 1 log-prob steps for completion 0"):
        generation_of_vllm_outputs([request([5, 6], steps[:1])], logprobs=True)
    with pytest.raises(ValueError, match="completion 0 lack its sampled token 6"):
        generation_of_vllm_outputs([request([5, 6], [steps[0], {7: FakeLogprob(-0.1, 1)}])],
                                   logprobs=True)


def test_vllm_hook_without_vllm_names_the_package(monkeypatch):
    from rlhf_fast.trainers.generation import vllm_generate_fn

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails
    with pytest.raises(ImportError, match="vllm_generate_fn needs the 'vllm' package"):
        vllm_generate_fn(object(), eos_token_id=0)


def test_loading_weights_needs_an_in_process_engine(tokenizer, fake_vllm):
    from rlhf_fast.trainers.generation import load_vllm_weights

    policy = demo.tiny_llama(tokenizer, hidden_size=32, seed=3)
    with pytest.raises(ValueError, match=r"needs the vLLM engine in this process .*"
                                         r"external_launcher"):
        load_vllm_weights(types.SimpleNamespace(llm_engine=None), policy)


def test_vllm_hook_on_a_real_engine(tokenizer, tmp_path):
    """One GRPO iteration with rollouts from a real vLLM engine on the tiny model (in
    fp32), its log-probs corrected against: the policy's and the engine's log-probs of
    the same tokens agree up to the engines' numerics."""
    vllm = pytest.importorskip("vllm", reason="the vLLM hook's real-engine test needs vllm")
    from rlhf_fast.trainers.generation import vllm_generate_fn

    policy = demo.tiny_llama(tokenizer, hidden_size=256, seed=3)  # head size 64
    policy.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    llm = vllm.LLM(model=str(tmp_path / "model"), dtype="float32", max_model_len=128,
                   enforce_eager=True, gpu_memory_utilization=0.3, seed=0,
                   logprobs_mode="processed_logprobs")
    hook = vllm_generate_fn(llm, eos_token_id=tokenizer.eos_token_id)
    row, = tiny_ppo(tokenizer, tmp_path / "run", policy, max_steps=1, generate_fn=hook,
                    rollout_is="token").train()
    assert row["rollout_is_mean"] == pytest.approx(1.0, abs=0.05)
    assert abs(row["rollout_kl"]) < 0.05
