"""Helpers shared by the tests."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import rlhf_fast
from rlhf_fast import reference


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def random_mask(B, T):
    """Rows of every kind: holes, left padding, right padding, both + holes, all masked,
    a single valid token, all valid (in random order)."""
    mask = torch.rand(B, T) < 0.75
    pos = torch.arange(T)
    for b in range(B):
        kind = b % 7
        cut = int(torch.randint(0, T + 1, ()))
        if kind == 1:
            mask[b] = pos >= cut
        elif kind == 2:
            mask[b] = pos < cut
        elif kind == 3:
            mask[b] = False
        elif kind == 4:
            mask[b] = False
            mask[b, int(torch.randint(0, max(T, 1), ())) % max(T, 1)] = T > 0
        elif kind == 5:
            mask[b] = True
        elif kind == 6:
            mask[b] &= (pos >= cut // 2) & (pos < (cut + T) // 2 + 1)
    return mask[torch.randperm(B)] if B else mask


def random_gae_case(B, T, dtype=torch.float32, bootstrap=True):
    rewards = torch.randn(B, T, dtype=torch.float64).to(dtype)
    values = torch.randn(B, T, dtype=torch.float64).to(dtype)
    last_value = torch.randn(B, dtype=torch.float64).to(dtype) if bootstrap else None
    return rewards, values, random_mask(B, T), last_value


def gae_ref64(rewards, values, mask, last_value, gamma, lam):
    """The reference in float64 on the same (rounded) inputs."""
    lv = None if last_value is None else last_value.double()
    return reference.gae(
        rewards.double(), values.double(), mask, gamma=gamma, lam=lam, last_value=lv
    )


def random_linear_case(lead, dim, vocab, dtype=torch.float64, *, bias=True, ignore_frac=0.2,
                       ignore_index=-100):
    """hidden [*lead, D], weight [V, D], bias [V] or None, labels [*lead]; logits of O(2)."""
    hidden = torch.randn(*lead, dim, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, dim, dtype=torch.float64) * (2.0 / math.sqrt(dim))).to(dtype)
    b = torch.randn(vocab, dtype=torch.float64).to(dtype) if bias else None
    labels = torch.randint(0, vocab, lead)
    labels[torch.rand(lead) < ignore_frac] = ignore_index
    return hidden, weight, b, labels


def leaves(hidden, weight, bias, train=(True, True, True), dtype=None):
    """Fresh leaf copies (in `dtype` if given); `train` says which require a gradient."""
    out = []
    for t, grad in zip((hidden, weight, bias), train):
        out.append(None if t is None else t.detach().to(dtype or t.dtype).clone()
                   .requires_grad_(grad))
    return out


def kernel_backward(op: str) -> str:
    """The grad_fn name of an eager call's output of the custom op ``rlhf_fast::<op>``
    (`rlhf_fast.ops.library.KernelOp`): the kernel ran."""
    return f"rlhf_fast_{op}Backward"


def assert_module_is_the_function(module_cls, function, args, options, **kwargs):
    """``module_cls(**o)(*args, **kwargs)`` equals ``function(*args, **kwargs, **o)`` bit
    for bit, values and the gradients of the inputs that require one (under one random
    upstream gradient), for `options` together and for each alone; each such module's
    repr shows its options, and its value differs from the defaults' (the option reached
    the op)."""
    leaves = [t for t in (*args, *kwargs.values())
              if isinstance(t, torch.Tensor) and t.requires_grad]
    upstream = []

    def run(fn, given):
        out = fn(*args, **kwargs, **given)
        if not upstream:
            upstream.append(torch.randn(out.shape, dtype=out.dtype))
        return out, torch.autograd.grad((out * upstream[0]).sum(), leaves)

    default, _ = run(function, {})
    for given in [options, *({name: value} for name, value in options.items())]:
        module = module_cls(**given)
        assert all(f"{name}={value!r}" in repr(module) for name, value in given.items())
        out, grads = run(module, {})
        expected, expected_grads = run(function, given)
        assert torch.equal(out, expected), given
        assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads)), given
        assert not torch.equal(out, default), given


def free_port() -> int:
    """A TCP port no process listens on now (for a process group's MASTER_PORT)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(script: Path, args: list[str], world: int, port: int) -> None:
    """Run `script` with `args` as `world` CPU processes of one process group (what
    torchrun sets: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR / PORT; gloo on the CPU),
    with the reference backend; fails with a rank's output if one exits non-zero."""
    # the ranks import the rlhf_fast under test (this checkout), not whatever install
    # `import rlhf_fast` finds from the script's folder
    tested = str(Path(rlhf_fast.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [tested, os.environ.get("PYTHONPATH")]))
    processes = []
    for rank in range(world):
        env = dict(os.environ, RLHF_FAST_BACKEND="torch", WORLD_SIZE=str(world), RANK=str(rank),
                   LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)
        env.pop("TRITON_INTERPRET", None)
        processes.append(subprocess.Popen([sys.executable, str(script), *args], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output.decode()[-3000:]


def sequence_classifier(tokenizer, seed: int):
    """A one-label Llama sequence classifier on `tokenizer` (a reward model or critic),
    built from a config with `seed`."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)
