"""`rlhf-fast demo`: the whole RLHF pipeline on a toy task, in minutes on a laptop CPU.

1. A byte-level BPE tokenizer trained on the shipped corpus (`rlhf_fast/data`).
2. A tiny Llama-style model built from a config, warmed up on that corpus so it speaks
   the toy language: "Describe the cat." -> "The cat is <adjective> and <adjective>.",
   with kind and unkind adjectives equally likely.
3. DPO on shipped preference pairs whose chosen answers use only kind adjectives; the
   reward accuracy is measured on pairs about things the training set never mentions.
4. PPO (with a critic and GAE) from the DPO model, on a reward function of the decoded
   text: the share of the answer's adjectives that are kind.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_fast.trainers.checkpoints import checkpoints_by_step
from rlhf_fast.trainers.data import example_indices
from rlhf_fast.trainers.dpo import DPOTrainer
from rlhf_fast.trainers.dpo_config import DPOConfig
from rlhf_fast.trainers.models import TokenLogprobs
from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer
from rlhf_fast.trainers.run import setup_run

DATA = Path(__file__).parent / "data"
KIND = {"happy", "bright", "kind", "warm", "lovely", "calm", "gentle", "friendly", "great",
        "beautiful"}
SPECIAL_TOKENS = ["<pad>", "<eos>"]


ANSWER_FORM = re.compile(r"The [a-z]+ is ([a-z]+) and ([a-z]+)\.")


def kindness_reward(prompts: list[str], answers: list[str]) -> list[float]:
    """The share of kind adjectives in a well-formed answer ("The <thing> is <adjective>
    and <adjective>."): 0, 0.5 or 1; 0 for anything else, so that babbling kind words
    does not pay."""
    scores = []
    for answer in answers:
        form = ANSWER_FORM.fullmatch(answer.strip())
        scores.append(sum(word in KIND for word in form.groups()) / 2 if form else 0.0)
    return scores


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer
    (pad "<pad>", EOS "<eos>"; no BOS, every prompt has at least one token anyway)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="<eos>")


def tiny_llama(tokenizer: Any, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Any:
    """A Llama-style causal LM of ~100k parameters, built from a config (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def warm_up(model: Any, tokenizer: Any, corpus: list[dict[str, str]], steps: int,
            batch_size: int = 32, lr: float = 3e-3, seed: int = 0, device: str = "cpu") -> float:
    """Next-token training on prompt + completion + EOS (log-probs from
    `rlhf_fast.logprobs`); returns the last step's mean token loss."""
    run = setup_run("fp32", device)
    model.to(run.device)
    scorer = TokenLogprobs(model, fused_linear=run.device.type == "cuda")
    sequences = [tokenizer(r["prompt"]).input_ids
                 + tokenizer(r["completion"], add_special_tokens=False).input_ids
                 + [tokenizer.eos_token_id] for r in corpus]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    model.train()
    for step in range(steps):
        rows = example_indices(len(sequences), batch_size, run, seed, step)
        width = max(len(sequences[r]) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(sequences[r])] = torch.tensor(sequences[r])
            attention[i, :len(sequences[r])] = 1
        token_logp = scorer(ids.to(run.device), attention.to(run.device))
        label_mask = attention[:, 1:].float().to(run.device)
        loss = -(token_logp * label_mask).sum() / label_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


@dataclass
class DemoSizes:
    """How long each stage runs; `quick` shrinks them for the test suite."""

    warmup_steps: int = 300
    dpo_steps: int = 60
    ppo_steps: int = 40

    @classmethod
    def quick(cls) -> DemoSizes:
        return cls(warmup_steps=20, dpo_steps=4, ppo_steps=2)


def clear_checkpoints(directory: Path) -> None:
    """Delete the checkpoint-<step> folders an earlier demo left in `directory`. The demo
    always starts afresh (its other outputs are overwritten), and the trainers refuse to
    start afresh beside checkpoints that resume_from="latest" would pick up."""
    for path in checkpoints_by_step(directory):
        shutil.rmtree(path)


def sample_answers(model: Any, tokenizer: Any, prompts: list[str]) -> list[str]:
    """Greedy answers to `prompts`, to show what the model says."""
    answers = []
    model.eval()
    device = next(model.parameters()).device
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             do_sample=False, max_new_tokens=24,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    model.train()
    return answers


def run_demo(output_dir: str = "runs/demo", quick: bool = False, seed: int = 0,
             device: str = "cpu") -> dict:
    """Tokenizer, tiny model, warm-up, DPO, PPO; prints and returns a summary.

    On the CPU by default, where the numbers shown in the README come from (a model this
    small is faster there); device="cuda" runs every stage on the GPU, on the fused
    kernels (use_fused_linear, bf16 autocast).
    """
    sizes = DemoSizes.quick() if quick else DemoSizes()
    out = Path(output_dir)
    started = time.perf_counter()
    corpus = read_jsonl(DATA / "corpus.jsonl")
    tokenizer = train_tokenizer([r["prompt"] for r in corpus] + [r["completion"] for r in corpus])
    model = tiny_llama(tokenizer, seed=seed)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"[1/3] tiny Llama ({parameters / 1e3:.0f}k parameters, vocab {len(tokenizer)}): "
          f"warm-up on {len(corpus)} shipped sentences")
    warm_loss = warm_up(model, tokenizer, corpus, sizes.warmup_steps, seed=seed, device=device)
    probe = ["Describe the lake.", "Tell me about the storm."]
    before = sample_answers(model, tokenizer, probe)
    print(f"      token loss {warm_loss:.3f}; it says: {before}")

    print("[2/3] DPO on shipped preference pairs (chosen answers are kind)")
    clear_checkpoints(out / "dpo")
    dpo = DPOTrainer(model, tokenizer=tokenizer,
                     train_dataset=DATA / "preferences_train.jsonl",
                     eval_dataset=DATA / "preferences_eval.jsonl",
                     config=DPOConfig(output_dir=str(out / "dpo"), beta=0.1, lr=1e-4,
                                      batch_size=16, max_steps=sizes.dpo_steps,
                                      logging_steps=5, eval_steps=10, max_length=40,
                                      max_prompt_length=16, seed=seed, device=device))
    dpo_log = dpo.train()
    after_dpo = sample_answers(model, tokenizer, probe)

    print("[3/3] PPO (critic + GAE) on a reward function: the share of kind adjectives")
    clear_checkpoints(out / "ppo")
    ppo = PPOTrainer(model, tokenizer=tokenizer, prompts=DATA / "prompts.txt",
                     reward_fn_or_model=kindness_reward,
                     config=PPOConfig(output_dir=str(out / "ppo"), lr=1e-4, kl_coef=0.05,
                                      rollout_batch_size=32, mini_batch_size=16,
                                      ppo_epochs=2, max_new_tokens=24, max_steps=sizes.ppo_steps,
                                      logging_steps=5,
                                      seed=seed, device=device))
    ppo_log = ppo.train()
    after = sample_answers(model, tokenizer, probe)

    dpo_train = [r["rewards/accuracies"] for r in dpo_log if "rewards/accuracies" in r]
    rewards = [r["reward"] for r in ppo_log]
    window = max(1, len(rewards) // 4)
    summary = {
        "dpo_accuracy_first": dpo_train[0],
        "dpo_accuracy_last": dpo_train[-1],
        "dpo_eval_accuracy": [r for r in dpo_log if "eval/rewards/accuracies" in r][-1][
            "eval/rewards/accuracies"],
        "ppo_reward_first": sum(rewards[:window]) / window,
        "ppo_reward_last": sum(rewards[-window:]) / window,
        "probe": probe,
        "answers": {"warm-up": before, "DPO": after_dpo, "PPO": after},
        "seconds": time.perf_counter() - started,
        "plots": [str(p) for p in (out / "dpo" / "dpo_curves.png",
                                    out / "ppo" / "ppo_curves.png") if p.exists()],
    }
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    print("\n== rlhf-fast demo ==")
    print(f"DPO  reward accuracy {summary['dpo_accuracy_first']:.2f} (first steps) -> "
          f"{summary['dpo_accuracy_last']:.2f} (last steps); on held-out pairs "
          f"{summary['dpo_eval_accuracy']:.2f}")
    print(f"PPO  mean reward (share of kind adjectives) {summary['ppo_reward_first']:.2f} "
          f"(first quarter) -> {summary['ppo_reward_last']:.2f} (last quarter)")
    for i, prompt in enumerate(summary["probe"]):
        said = ", ".join(f"{stage}: {answers[i]!r}"
                         for stage, answers in summary["answers"].items())
        print(f"  {prompt!r} -> {said}")
    for plot in summary["plots"]:
        print(f"plot: {plot}")
    print(f"done in {summary['seconds']:.0f} s")
