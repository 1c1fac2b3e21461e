"""The generation hook of `PPOTrainer`: rollouts from an inference engine other than
transformers' ``generate`` (vLLM's offline ``LLM``, SGLang, a server), as TRL's
``use_vllm`` and verl's rollout workers do.

A hook is ``generate_fn(prompt_ids, *, max_new_tokens, temperature, top_p, top_k, seed)
-> Generation``: one completion per prompt row (a prompt sampled group_size times comes
group_size times), sampled as the trainer's own ``generate`` would (temperature 0 asks
for greedy answers: remax's baselines, evaluation), each completion ending at the first
EOS or cut at max_new_tokens. `check_generation` checks what it returns and
`completion_tensors` packs it into the right-padded tensors the trainer reads.

`vllm_generate_fn` is such a hook on vLLM's offline ``LLM`` (imported only when it is
called), with the engine's log-probs of the sampled tokens for the rollout correction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import nn

from rlhf_fast.trainers.model_state import is_peft_model

if TYPE_CHECKING:
    from transformers import GenerationConfig


class Generation(NamedTuple):
    """What a generation hook returns, one row per prompt row it was given.

    completion_ids: the sampled token ids of each completion (without its prompt), the
        last one the tokenizer's EOS, or max_new_tokens of them with no EOS;
    logprobs: None, or the engine's log-prob of each sampled token (one float per id of
        `completion_ids`, at the sampling temperature): the rollout log-probs that verl's
        rollout correction (PPOConfig.rollout_is, rollout_rs) compares with the policy's.
    """

    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None = None


class GenerateFn(Protocol):
    """The signature of `PPOTrainer`'s generate_fn."""

    def __call__(self, prompt_ids: list[list[int]], *, max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, seed: int) -> Generation: ...


def _fail(problem: str) -> ValueError:
    return ValueError(f"generate_fn returned {problem}")


def _check_completion(row: int, ids: Sequence[int], *, eos_id: int, vocab_size: int,
                      max_new_tokens: int) -> None:
    """One completion: 1 to max_new_tokens ids in [0, vocab_size), an EOS only last,
    max_new_tokens ids when it has no EOS."""
    if not isinstance(ids, (list, tuple)) or not 1 <= len(ids) <= max_new_tokens:
        size = len(ids) if isinstance(ids, (list, tuple)) else type(ids).__name__
        raise _fail(f"completion {row} of {size} tokens; expected a list of 1 to "
                    f"max_new_tokens={max_new_tokens} token ids")
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int)
           or not 0 <= i < vocab_size]
    if bad:
        raise _fail(f"token id {bad[0]!r} in completion {row}; expected ints in "
                    f"[0, {vocab_size}) (the policy's vocabulary)")
    if eos_id in ids[:-1]:
        raise _fail(f"completion {row} with tokens after its EOS (id {eos_id}, at "
                    f"position {list(ids).index(eos_id)}); expected it to end at its first EOS")
    if ids[-1] != eos_id and len(ids) != max_new_tokens:
        raise _fail(f"completion {row} of {len(ids)} tokens without EOS (id {eos_id}); "
                    f"expected it to end at EOS or run to max_new_tokens={max_new_tokens} "
                    f"(stop at the tokenizer's EOS only, as generate does)")


def _check_logprobs(logprobs: object, completion_ids: list[list[int]]) -> None:
    """One finite float per completion token."""
    if not isinstance(logprobs, (list, tuple)) or len(logprobs) != len(completion_ids):
        size = len(logprobs) if isinstance(logprobs, (list, tuple)) else type(logprobs).__name__
        raise _fail(f"logprobs for {size} completions; expected None or one list per "
                    f"completion ({len(completion_ids)})")
    for row, (values, ids) in enumerate(zip(logprobs, completion_ids)):
        if not isinstance(values, (list, tuple)) or len(values) != len(ids):
            size = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise _fail(f"{size} logprobs for completion {row} of {len(ids)} tokens; "
                        f"expected one log-prob per completion token")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) for v in values):
            raise _fail(f"a non-finite or non-numeric log-prob in completion {row}; "
                        f"expected finite floats")


def check_generation(generation: object, *, rows: int, eos_id: int, vocab_size: int,
                     max_new_tokens: int) -> Generation:
    """`generation` as a `Generation` if it is a valid answer to `rows` prompt rows (see
    `Generation`), else ValueError naming generate_fn and what was expected."""
    if not isinstance(generation, Generation):
        raise _fail(f"a {type(generation).__name__}; expected a "
                    f"rlhf_fast.trainers.generation.Generation")
    completion_ids = generation.completion_ids
    if not isinstance(completion_ids, (list, tuple)) or len(completion_ids) != rows:
        size = len(completion_ids) if isinstance(completion_ids, (list, tuple)) else \
            type(completion_ids).__name__
        raise _fail(f"{size} completions; expected one per prompt row ({rows})")
    for row, ids in enumerate(completion_ids):
        _check_completion(row, ids, eos_id=eos_id, vocab_size=vocab_size,
                          max_new_tokens=max_new_tokens)
    if generation.logprobs is not None:
        _check_logprobs(generation.logprobs, completion_ids)
    return generation


def completion_tensors(generation: Generation, pad_id: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(answers [B, R] int64, right-padded with `pad_id` to the longest completion R;
    rollout_logp [B, R] fp32, 0 on the padding, or None without logprobs), on `device`.
    A checked `Generation`: its log-probs line up with the answer tokens."""
    width = max(len(ids) for ids in generation.completion_ids)
    rows = len(generation.completion_ids)
    answers = torch.full((rows, width), pad_id, dtype=torch.long)
    logp = None if generation.logprobs is None else torch.zeros(rows, width)
    for row, ids in enumerate(generation.completion_ids):
        answers[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        if logp is not None:
            logp[row, :len(ids)] = torch.tensor(generation.logprobs[row], dtype=torch.float32)
    return answers.to(device), None if logp is None else logp.to(device)


def generation_seed(seed: int, iteration: int, rank: int) -> int:
    """The seed the generation hook gets for one rollout: a function of the config's
    seed, the iteration and the process (no draw from torch's random streams)."""
    return (seed * 1_000_003 + iteration * 4_099 + rank) % 2**31


def hook_sampling(generation_config: GenerationConfig) -> dict[str, Any]:
    """The generation hook's keywords for a transformers generation config: its
    max_new_tokens, temperature, top_p and top_k (0: none); temperature 0 (and top_p 1,
    top_k 0) for greedy answers."""
    config = generation_config
    sampled = dict(temperature=float(config.temperature), top_p=float(config.top_p),
                   top_k=int(config.top_k or 0)) if config.do_sample else \
        dict(temperature=0.0, top_p=1.0, top_k=0)
    return dict(max_new_tokens=int(config.max_new_tokens), **sampled)


# --- vLLM's offline LLM as the hook ------------------------------------------------------


def vllm_generate_fn(llm: Any, *, eos_token_id: int, policy: nn.Module | None = None,
                     logprobs: bool = True) -> GenerateFn:
    """A generate_fn that samples with vLLM's offline ``LLM`` (``vllm.LLM``).

    Each prompt row is one request (``{"prompt_token_ids": ids}``) with its own
    ``SamplingParams``: the hook's max_new_tokens, temperature (0: greedy), top_p and
    top_k (0: none), a seed of its own (the hook's seed and the row: the group_size
    copies of a prompt must not draw the same answer), ``stop_token_ids=[eos_token_id]``
    and, with `logprobs`, ``logprobs=0``: vLLM then returns, at each step, the log-prob
    of the sampled token, which becomes the `Generation`'s logprobs (the rollout
    correction's rollout_logp). Build the LLM with ``logprobs_mode="processed_logprobs"``
    for log-probs after temperature, which the correction compares with the policy's at
    PPOConfig.temperature (vLLM's default reports them before it); stopping must be at
    the tokenizer's EOS only, as ``generate`` does.

    policy: if given, its weights are loaded into the engine before each generation
    (`load_vllm_weights`), so that the answers are the current policy's; else keeping
    the engine's weights current is the caller's part.

    Raises ImportError naming the package when vllm is not installed.
    """
    try:
        from vllm import SamplingParams
    except ImportError as exc:
        raise ImportError("vllm_generate_fn needs the 'vllm' package (pip install vllm), "
                          "which is not installed") from exc

    def generate_fn(prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                    top_p: float, top_k: int, seed: int) -> Generation:
        if policy is not None:
            load_vllm_weights(llm, policy)
        params = [SamplingParams(n=1, max_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, top_k=top_k if top_k > 0 else -1,
                                 seed=(seed * 1_000_003 + row) % 2**31,
                                 stop_token_ids=[eos_token_id],
                                 logprobs=0 if logprobs else None)
                  for row in range(len(prompt_ids))]
        outputs = llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids],
                               params, use_tqdm=False)
        return generation_of_vllm_outputs(outputs, logprobs=logprobs)

    return generate_fn


def generation_of_vllm_outputs(outputs: Sequence[Any], *, logprobs: bool) -> Generation:
    """A `Generation` of vLLM's ``RequestOutput`` list: each request's first completion
    (``outputs[0]``), its ``token_ids`` and, with `logprobs`, the ``logprob`` of the
    sampled token at each step of its ``logprobs`` (one ``{token_id: Logprob}`` per
    token)."""
    completions = [request.outputs[0] for request in outputs]
    ids = [list(completion.token_ids) for completion in completions]
    if not logprobs:
        return Generation(ids)
    sampled = []
    for row, (completion, tokens) in enumerate(zip(completions, ids)):
        steps = completion.logprobs
        if steps is None or len(steps) != len(tokens):
            size = "no" if steps is None else len(steps)
            raise ValueError(f"vLLM returned {size} log-prob steps for completion {row} of "
                             f"{len(tokens)} tokens; expected one per token "
                             "(SamplingParams(logprobs=0))")
        try:
            sampled.append([float(step[token].logprob) for step, token in zip(steps, tokens)])
        except KeyError as exc:
            raise ValueError(f"vLLM's log-probs of completion {row} lack its sampled token "
                             f"{exc.args[0]}") from exc
    return Generation(ids, sampled)


def load_vllm_weights(llm: Any, policy: nn.Module) -> None:
    """Load `policy`'s weights (a transformers model's names, which vLLM's
    ``load_weights`` reads) into the model of an ``LLM`` whose engine runs in this
    process (``distributed_executor_backend="external_launcher"``, as TRL's colocate
    mode builds it), then reset its prefix cache (its KV entries are the old weights').
    An engine in other processes (vLLM's default multiprocessing, a server) needs its
    own weight transfer: this raises ValueError saying so. A peft (LoRA) policy is
    refused: vLLM would need the merged weights."""
    if is_peft_model(policy):
        raise ValueError("load_vllm_weights takes a full model, not a peft one: merge the "
                         "adapter into a copy (merge_and_unload) and load that")
    try:
        model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    except AttributeError as exc:
        raise ValueError(
            "load_vllm_weights needs the vLLM engine in this process "
            "(LLM(..., distributed_executor_backend=\"external_launcher\")), as TRL's "
            f"colocate mode builds it; this LLM has no in-process model ({exc})") from exc
    with torch.no_grad():
        model.load_weights((name, tensor.detach()) for name, tensor in policy.state_dict().items())
    llm.reset_prefix_cache()
