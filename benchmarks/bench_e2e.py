"""End to end: one DPO optimizer step and one PPO update of a 1B-class model, fused
versus eager, through the library's own trainers.

Model: a Llama-3.2-1B-shaped ``LlamaConfig`` (hidden 2048, 16 layers, 32 heads / 8 KV
heads, MLP 8192, vocab 128256, tied embeddings: 1.24B parameters) built from the config
with random weights (no download); ``--quick`` / no GPU: a 2-layer, 64-wide one.
fp32 master weights, bf16 autocast on the GPU (the trainers' "auto" precision).

Modes:

* ``dpo-step``: `DPOTrainer.optimizer_step` on a batch of ``PAIRS`` preference pairs,
  prompt and answers of ``T / 2`` tokens each (chosen and rejected stacked: 2 PAIRS
  sequences of T tokens): the policy forward + backward, the frozen reference's forward,
  the loss, AdamW.
* ``ppo-update``: `PPOTrainer.update` of one rollout of ``ROLLOUT`` sequences (prompt
  T / 4, answer 3 T / 4 tokens; one epoch, one minibatch): policy and critic (a copy of
  the backbone with a scalar head) forward + backward, the loss, AdamW. The rollout is
  built once with `PPOTrainer.evaluate_answers` on random answers (generation is not
  timed: its speed is the model's, not ours).

Providers (same weights, same batch):

* ``rlhf_fast-fused``: ``use_fused_linear=True``: log-probs (and entropy) from the last
  hidden state and the lm_head weight by `linear_logprobs`; the [tokens, vocab] logits
  never exist. Every loss op on its Triton kernel.
* ``rlhf_fast-logits``: ``use_fused_linear=False``: the model's bf16 logits through the
  Triton `logprobs` kernel (no fp32 copy).
* ``eager``: the same trainer with ``RLHF_FAST_BACKEND=torch``: every op is
  `rlhf_fast.reference`, the way trainers write it (upcast the logits to fp32,
  ``log_softmax``, ``gather``; losses as a dozen small PyTorch ops).

Gate: each provider's per-sequence answer log-probs on the timed batch (before any step)
against those of an eager trainer built from the same weights (so the eager row passes
its own gate by construction), relative 2-norm error <= 2e-2 on a GPU (bf16 logits round
differently in the two paths) and 1e-4 on the CPU (fp32).

Columns: median / IQR of the step, peak memory above the trainer's resident state,
``tokens`` per step, ``tokens_per_s``; roofline = model FLOPs (6 x parameters per trained
token forward + backward, 2 x parameters per reference-forward token) over the bf16 GEMM
rate measured in the same run, i.e. model FLOPs utilisation (attention FLOPs left out).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

import rlhf_fast
from rlhf_fast.benchmarks import cases, gates
from rlhf_fast.benchmarks.cases import Case
from rlhf_fast.trainers import DPOConfig, DPOTrainer, PPOConfig, PPOTrainer

OP = "e2e"
MODES = ("dpo-step", "ppo-update")
PAIRS, ROLLOUT = 4, 8
GPU_T, QUICK_T = 1024, 32
MODEL_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                tie_word_embeddings=True, max_position_embeddings=GPU_T)
MODEL_QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                   max_position_embeddings=QUICK_T)
EOS, PAD = 1, 0
#: The trainers' "auto" precision where the session runs (on CUDA when there is a GPU).
DTYPE = "bf16 autocast" if torch.cuda.is_available() else "fp32"
#: A case's size: (model, tokens per row).
GPU_SIZE, QUICK_SIZE = ("1B", GPU_T), ("tiny", QUICK_T)


def model_config(case: Case) -> dict[str, Any]:
    return MODEL_QUICK if case.shape == QUICK_SIZE else MODEL_1B


def tokens_per_row(case: Case) -> int:
    return case.shape[1]


def rows(case: Case) -> int:
    """Sequences per step: the stacked pairs, or the rollout."""
    return 2 * PAIRS if case.mode == "dpo-step" else ROLLOUT


class IdTokenizer:
    """Text of space-separated token ids -> those ids: lets the trainers take synthetic
    token sequences of exact lengths through their normal data path."""

    eos_token_id, pad_token_id = EOS, PAD

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> Any:
        """One text's ids, or (a batch, as `datasets.map` tokenises) a list of them."""
        ids = [[int(t) for t in one.split()] for one in ([text] if isinstance(text, str)
                                                          else text)]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}


def random_text(generator: torch.Generator, length: int, vocab: int) -> str:
    ids = torch.randint(2, vocab, (length,), generator=generator)  # never EOS / PAD
    return " ".join(map(str, ids.tolist()))


@contextlib.contextmanager
def backend(provider: str) -> Iterator[None]:
    """RLHF_FAST_BACKEND=torch for the eager provider, during setup and every call."""
    previous = os.environ.get("RLHF_FAST_BACKEND")
    if provider == "eager":
        os.environ["RLHF_FAST_BACKEND"] = "torch"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RLHF_FAST_BACKEND", None)
        else:
            os.environ["RLHF_FAST_BACKEND"] = previous


def build_model(case: Case, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**model_config(case), pad_token_id=PAD,
                         eos_token_id=EOS, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config)


def dpo_trainer(case: Case, device: torch.device, output_dir: str) -> DPOTrainer:
    vocab = model_config(case)["vocab_size"]
    half = tokens_per_row(case) // 2
    generator = torch.Generator().manual_seed(1)
    records = [{"prompt": random_text(generator, half, vocab),
                "chosen": random_text(generator, half - 1, vocab),  # + EOS
                "rejected": random_text(generator, half - 1, vocab)} for _ in range(PAIRS)]
    config = DPOConfig(output_dir=output_dir, lr=1e-6, batch_size=PAIRS, max_steps=10**6,
                       max_length=tokens_per_row(case), max_prompt_length=half,
                       device=str(device), use_fused_linear=case.provider == "rlhf_fast-fused")
    return DPOTrainer(build_model(case, device), tokenizer=IdTokenizer(),
                      train_dataset=records, config=config)


def ppo_trainer(case: Case, device: torch.device, output_dir: str):
    vocab = model_config(case)["vocab_size"]
    prompt = tokens_per_row(case) // 4
    generator = torch.Generator().manual_seed(2)
    config = PPOConfig(output_dir=output_dir, lr=1e-6, rollout_batch_size=ROLLOUT,
                       mini_batch_size=ROLLOUT, ppo_epochs=1,
                       max_new_tokens=tokens_per_row(case) - prompt, device=str(device),
                       use_fused_linear=case.provider == "rlhf_fast-fused")
    prompts = [random_text(generator, prompt, vocab) for _ in range(ROLLOUT)]
    trainer = PPOTrainer(build_model(case, device), reward_fn_or_model=lambda p, a: [0.0] * len(p),
                         tokenizer=IdTokenizer(), prompts=prompts, config=config)
    sequences = torch.randint(2, vocab, (ROLLOUT, tokens_per_row(case)), generator=generator)
    attention_mask = torch.ones_like(sequences)
    scores = torch.randn(ROLLOUT, generator=generator)
    rollout = trainer.evaluate_answers(sequences.to(device), attention_mask.to(device), prompt,
                                       scores.to(device))
    return trainer, rollout


def answer_logps(case: Case, trainer: Any, batch: Any) -> torch.Tensor:
    """[rows] answer log-probs of the timed batch under the trainer's policy."""
    with torch.no_grad(), trainer.run.autocast():
        if case.mode == "dpo-step":
            token_logp = trainer.policy(batch.input_ids, batch.attention_mask)
            return rlhf_fast.sequence_logps(token_logp, batch.answer_mask)
        logp, _, _ = trainer.actor_critic(batch.sequences, batch.attention_mask,
                                          batch.prompt_width)
        return (logp * batch.mask).sum(-1)


def model_flops(case: Case, trainer: Any) -> float:
    """6 x parameters per trained token + 2 x parameters per reference-forward token."""
    tokens = (2 * PAIRS if case.mode == "dpo-step" else ROLLOUT) * tokens_per_row(case)
    if case.mode == "dpo-step":
        n = sum(p.numel() for p in trainer.model.parameters())
        return (6 + 2) * n * tokens
    trained = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    return 6 * sum(p.numel() for p in trained) * tokens


_eager_logps: dict[tuple[str, Any], torch.Tensor] = {}


def eager_answer_logps(case: Case, device: torch.device) -> torch.Tensor:
    """The gate's reference: the eager trainer's answer log-probs, once per mode."""
    key = (case.mode, case.shape)
    if key not in _eager_logps:
        eager = dataclasses.replace(case, provider="eager")
        with backend("eager"), tempfile.TemporaryDirectory() as output_dir:
            if case.mode == "dpo-step":
                trainer = dpo_trainer(eager, device, output_dir)
                batch = trainer._train_batch(0)
            else:
                trainer, batch = ppo_trainer(eager, device, output_dir)
            _eager_logps[key] = answer_logps(eager, trainer, batch).cpu()
        del trainer, batch
    return _eager_logps[key]


@dataclasses.dataclass
class Inputs:
    """One case's trainer (built under its provider's backend), the timed batch, its step
    and model FLOPs, and the gate's reference; `output_dir` lives as long as they do."""

    provider: str
    device: torch.device
    trainer: Any
    batch: Any
    step: Any
    flops: float
    reference: torch.Tensor
    output_dir: tempfile.TemporaryDirectory


def make_inputs(case: Case, device: torch.device) -> Inputs:
    reference = eager_answer_logps(case, device)
    output_dir = tempfile.TemporaryDirectory()
    with backend(case.provider):
        if case.mode == "dpo-step":
            trainer = dpo_trainer(case, device, output_dir.name)
            batch = trainer._train_batch(0)
            step = trainer.optimizer_step
        else:
            trainer, batch = ppo_trainer(case, device, output_dir.name)

            def step() -> Any:
                return trainer.update(batch)

    return Inputs(case.provider, device, trainer, batch, step, model_flops(case, trainer),
                  reference, output_dir)


def run_step(inp: Inputs) -> Any:
    """The provider: the trainer's step, under the provider's backend."""
    with backend(inp.provider):
        return inp.step()


#: Every provider runs its trainer's step (`run_step`); they differ in how it was built.
PROVIDERS = dict.fromkeys(("rlhf_fast-fused", "rlhf_fast-logits", "eager"), run_step)


def _gate(case: Case, inp: Inputs, fn: Any) -> tuple[bool, dict[str, float]]:
    with backend(case.provider):
        ours = answer_logps(case, inp.trainer, inp.batch)
    tolerance = 2e-2 if inp.device.type == "cuda" else 1e-4
    ok, error = gates.check_close(ours, inp.reference, tolerance)
    return ok, {"answer_logps": error}


def _columns(case: Case, inp: Inputs, times: dict[str, float], rate: float) -> dict[str, Any]:
    seconds = times["median_ms"] * 1e-3
    tokens = rows(case) * tokens_per_row(case)
    return {"tokens": tokens, "tokens_per_s": tokens / seconds,
            "model_tflops": inp.flops / seconds / 1e12, "frac_roofline": inp.flops / seconds / rate}


def _label(case: Case) -> str:
    model, t = case.shape
    return f"{model}-T{t}"


SUITE = cases.Suite(
    OP, [(GPU_SIZE, DTYPE)], [(QUICK_SIZE, DTYPE)], MODES, PROVIDERS, make_inputs,
    gate=_gate,
    timed=lambda case, inp, fn: ((lambda: fn(inp)), None),
    columns=_columns,
    roofline="gemm",
    budget=lambda case: cases.Budget(warmup_ms=500, rep_ms=3000, cpu_repeats=3),
    table_shape=lambda case: [rows(case), tokens_per_row(case)],
    label=_label,
)


def test_e2e(case: Case, bench_session: Any, benchmark: Any) -> None:
    SUITE.run_test(case, bench_session, benchmark)
