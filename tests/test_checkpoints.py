"""checkpoint-<step>/ folders: their layout, the transformers export, atomic writes,
pruning, safe loading (weights_only torch files, DCP's metadata), and the critic's
round trip through value_model/."""
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import free_port, run_ranks
from rlhf_fast import demo
from rlhf_fast.trainers import checkpoints as ckpt
from rlhf_fast.trainers.dpo import DPOTrainer
from rlhf_fast.trainers.dpo_config import DPOConfig
from rlhf_fast.trainers.model_state import (
    load_dcp_metadata,
    load_sharded_state,
    save_sharded_state,
)
from rlhf_fast.trainers.models import ValueModel
from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer

TRAIN = demo.DATA / "preferences_train.jsonl"
PROMPTS = demo.DATA / "prompts.txt"


@pytest.fixture(scope="module")
def tokenizer():
    corpus = demo.read_jsonl(demo.DATA / "corpus.jsonl")
    return demo.train_tokenizer([r["prompt"] for r in corpus]
                                + [r["completion"] for r in corpus])


def _dpo(tokenizer, directory, **options):
    records = [json.loads(line) for line in TRAIN.read_text().splitlines()[:8]]
    config = DPOConfig(output_dir=str(directory), batch_size=4, lr=1e-3, max_length=40,
                       max_prompt_length=16, seed=5, device="cpu", **options)
    model = demo.tiny_llama(tokenizer, hidden_size=32, seed=2)
    return DPOTrainer(model, tokenizer=tokenizer, train_dataset=records, config=config)


def _ppo(tokenizer, directory, **options):
    config = PPOConfig(output_dir=str(directory), rollout_batch_size=2, mini_batch_size=2,
                       max_new_tokens=4, lr=1e-3, seed=7, device="cpu", **options)
    return PPOTrainer(demo.tiny_llama(tokenizer, hidden_size=32, seed=3), tokenizer=tokenizer,
                      prompts=PROMPTS, reward_fn_or_model=lambda p, a: [len(x) / 9 for x in a],
                      config=config)


def test_folder_layout_and_from_pretrained_gives_the_weights_at_that_step(
        tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    trainer = _dpo(tokenizer, tmp_path, max_steps=2, save_steps=1)
    at_step_1 = {}
    save = trainer.save_checkpoint

    def save_and_remember():
        at_step_1.setdefault(trainer.step, {k: v.clone() for k, v in
                                            trainer.model.state_dict().items()})
        return save()

    trainer.save_checkpoint = save_and_remember
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1",
                                                                    "checkpoint-2"]
    names = {p.name for p in (tmp_path / "checkpoint-1").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "optimizer.pt",
            "scheduler.pt", "rng_state_0.pth", "trainer_state.json",
            "trainer_state.safetensors"} <= names
    assert not any(n.endswith(".bin") for n in names)
    state = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["config"]["seed"] == 5
    assert set(state["frozen_models"]) == {"reference"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-1").state_dict()
    want = at_step_1[1]
    assert set(loaded) == set(want)
    assert all(torch.equal(loaded[k], want[k]) for k in want)


def test_a_crash_mid_save_leaves_no_checkpoint_and_its_temp_is_removed_next_start(
        tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    trainer = _dpo(tokenizer, tmp_path, max_steps=1)

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-save")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save_safetensors", crash)
        with pytest.raises(RuntimeError, match="killed mid-save"):
            trainer.train()
    assert not (tmp_path / "checkpoint-1").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint-")]
    # a kill (no except clause runs) leaves the temp folder: the next start removes it
    stale = tmp_path / ".checkpoint-1.tmp-k1ll3d00"
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"half")
    _dpo(tokenizer, tmp_path, max_steps=1).train()
    assert not stale.exists() and (tmp_path / "checkpoint-1").is_dir()


def test_a_full_disk_during_a_checkpoint_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    import errno

    from rlhf_fast.trainers.files import write_folder_atomic

    def full(directory):
        (directory / "a").write_bytes(b"x")
        raise RuntimeError("unexpected pos") from OSError(errno.ENOSPC, "No space")

    with pytest.raises(OSError) as error:
        write_folder_atomic(tmp_path / "checkpoint-3", full)
    assert error.value.errno == errno.ENOSPC and "the disk is full" in str(error.value)
    assert os.listdir(tmp_path) == []


def test_prune_deletes_the_oldest_folders(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    deleted = ckpt.prune_checkpoints(tmp_path / "checkpoint-3", 2)
    assert [p.name for p in deleted] == ["checkpoint-1"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_malicious_optimizer_pt_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state": _RunsCode(marker)}, tmp_path / "optimizer.pt")
    with pytest.raises(ValueError, match="refusing to load checkpoint file"):
        ckpt.load_torch_file(tmp_path / "optimizer.pt")
    assert not marker.exists()


def test_dcp_round_trip_and_a_malicious_metadata_is_refused(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).pow(2).sum().backward()
    optimizer.step()
    save_sharded_state(model, optimizer, tmp_path / "dcp")
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-2)
    load_sharded_state(other, other_optimizer, tmp_path / "dcp")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 other.state_dict().values()))
    want, got = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    assert all(torch.equal(want[i]["exp_avg_sq"], got[i]["exp_avg_sq"]) for i in want)

    marker = tmp_path / "ran"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ValueError, match="not one of DCP's metadata classes"):
        load_dcp_metadata(tmp_path / "dcp" / ".metadata")
    # DCP re-raises the reader's error inside its CheckpointException (a BaseException)
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException) as refused:
        load_sharded_state(other, other_optimizer, tmp_path / "dcp")
    assert "not one of DCP's metadata classes" in str(refused.value)
    assert not marker.exists()


def test_the_critic_round_trips_through_value_model(tokenizer, tmp_path, monkeypatch):
    from rlhf_fast.cli_train import load_sequence_scorer

    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    trainer = _ppo(tokenizer, tmp_path, max_steps=1)
    trainer.train()
    trained = trainer.value_model.state_dict()
    assert not torch.equal(trained["head.weight"], torch.zeros_like(trained["head.weight"]))
    for folder in (tmp_path / "value_model", tmp_path / "checkpoint-1" / "value_model"):
        for critic in (ValueModel.from_pretrained(folder), load_sequence_scorer(str(folder))):
            assert isinstance(critic, ValueModel)
            loaded = critic.state_dict()
            assert set(loaded) == set(trained)
            assert all(torch.equal(loaded[k], trained[k]) for k in trained), folder
    # and a PPO run starts from it
    shutil.rmtree(tmp_path / "checkpoint-1")
    critic = ValueModel.from_pretrained(tmp_path / "value_model")
    PPOTrainer(demo.tiny_llama(tokenizer, hidden_size=32, seed=3), value_model=critic,
               tokenizer=tokenizer, prompts=PROMPTS,
               reward_fn_or_model=lambda p, a: [0.0] * len(a),
               config=PPOConfig(output_dir=str(tmp_path / "again"), rollout_batch_size=2,
                                mini_batch_size=2, max_new_tokens=4, max_steps=1,
                                device="cpu")).train()


def test_an_unrecorded_frozen_model_is_not_checked_a_recorded_one_is(tmp_path):
    """Early LoRA checkpoints marked the policy's disabled adapter "-" (no fingerprint):
    a resume cannot check it, and does not refuse it; a recorded one must match."""
    current = {"reference": {"name_or_path": "base", "weights": "abc"}}
    unrecorded = {"reference": {"name_or_path": "old", "weights": ckpt.UNRECORDED}}
    ckpt.check_same_frozen_models(unrecorded, current, tmp_path)
    with pytest.raises(ValueError, match="different reference"):
        ckpt.check_same_frozen_models(
            {"reference": {"name_or_path": "base", "weights": "def"}}, current, tmp_path)


FSDP2_RESUME_SCRIPT = """
import json, os, sys, torch
from torch.distributed.fsdp import fully_shard
from transformers import AutoTokenizer
from rlhf_fast import demo
from rlhf_fast.trainers import DPOConfig, DPOTrainer
tokenizer_dir, data, out = sys.argv[1:]
sys.modules["matplotlib"] = None  # no curves plot (a notice instead): 1-2 s less per run
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
records = [json.loads(line) for line in open(data).read().splitlines()[:4]]

def train(name, max_steps, resume_from=None):
    model = demo.tiny_llama(tokenizer, hidden_size=16, layers=1, seed=2)
    reference = demo.tiny_llama(tokenizer, hidden_size=16, layers=1, seed=2)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    config = DPOConfig(output_dir=os.path.join(out, name), batch_size=1, lr=1e-2,
                       max_length=24, max_prompt_length=8, max_steps=max_steps, save_steps=1,
                       device="cpu", use_fused_linear=False, lr_scheduler_type="constant",
                       resume_from=resume_from, seed=5)
    DPOTrainer(model, reference, tokenizer=tokenizer, train_dataset=records,
               config=config).train()
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # a collective
    if torch.distributed.get_rank() == 0:
        torch.save(full, os.path.join(out, name + ".pt"))

train("a", 2)
train("b", 2, os.path.join(out, "a", "checkpoint-1"))
"""


def test_fsdp2_checkpoints_shard_through_dcp_and_resume_exactly(tokenizer, tmp_path):
    """Two gloo processes train an FSDP2-sharded DPO policy 2 steps, a checkpoint at each;
    a second run resumed from the first one's checkpoint-1 ends with the same weights.
    Each checkpoint holds every rank's shards of model and optimizer in dcp/ (no
    optimizer.pt) and the full model gathered for from_pretrained."""
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    script = tmp_path / "fsdp2_resume.py"
    script.write_text(FSDP2_RESUME_SCRIPT)
    run_ranks(script, [str(tmp_path / "tokenizer"), str(TRAIN), str(tmp_path)], 2,
              free_port())

    for step in (1, 2):
        folder = tmp_path / "a" / f"checkpoint-{step}"
        files = set(os.listdir(folder / ckpt.DCP_FOLDER))
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= files, files
        assert not (folder / ckpt.OPTIMIZER_FILE).exists()
        assert (folder / "model.safetensors").is_file()
    uninterrupted = torch.load(tmp_path / "a.pt", weights_only=True)
    resumed = torch.load(tmp_path / "b.pt", weights_only=True)
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    initial = demo.tiny_llama(tokenizer, hidden_size=16, layers=1, seed=2).state_dict()
    assert any(not torch.equal(initial[k], uninterrupted[k]) for k in initial)
    exported = load_file(tmp_path / "a" / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(exported[k], uninterrupted[k]) for k in exported)
