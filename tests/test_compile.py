"""A GRPO step and a DPO step built from the public ops, on the logits path and on the
hidden-state path, compiled whole by ``torch.compile(fullgraph=True)``: no graph break,
the eager loss and gradients, and one compiled graph for every batch shape with
``dynamic=True``."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import rlhf_fast

F64 = torch.float64
V, D, GROUP = 13, 8, 2


def grpo_step_logits(hidden, weight, labels, old_logp, scores, mask):
    logits = hidden @ weight.T
    logp, entropy = rlhf_fast.logprobs(logits, labels, return_entropy=True)
    advantages = rlhf_fast.group_advantages(scores, group_size=GROUP)
    out = rlhf_fast.ppo_loss(logp, old_logp, advantages[:, None].expand_as(logp), mask,
                             entropy=entropy, entropy_coef=0.01, clip_eps_high=0.28,
                             agg="seq-mean-token-mean")
    return out.loss


def grpo_step_hidden(hidden, weight, labels, old_logp, scores, mask):
    advantages = rlhf_fast.group_advantages(scores, group_size=GROUP)
    return rlhf_fast.linear_ppo_loss(hidden, weight, labels, old_logp,
                                     advantages[:, None].expand_as(old_logp), mask,
                                     clip_eps_high=0.28).loss


def dpo_step_logits(hidden, weight, labels, ref_logp, scores, mask):
    logp = rlhf_fast.logprobs(hidden @ weight.T, labels)
    pair = rlhf_fast.pair_logps(logp, mask)
    ref = rlhf_fast.pair_logps(ref_logp, mask)
    return rlhf_fast.dpo_loss(pair.chosen, pair.rejected, ref.chosen, ref.rejected,
                              beta=0.1, label_smoothing=0.05).loss


def dpo_step_hidden(hidden, weight, labels, ref_logp, scores, mask):
    ref = rlhf_fast.pair_logps(ref_logp, mask)
    return rlhf_fast.linear_dpo_loss(hidden, weight, labels, mask, ref.chosen,
                                     ref.rejected, beta=0.1, label_smoothing=0.05).loss


STEPS = [grpo_step_logits, grpo_step_hidden, dpo_step_logits, dpo_step_hidden]


def batch(rows: int, length: int) -> tuple[torch.Tensor, ...]:
    """(hidden, weight, labels, old / reference log-probs, scores, mask) of `rows`
    sequences of `length` tokens; hidden and weight require grad."""
    hidden = torch.randn(rows, length, D, dtype=F64, requires_grad=True)
    weight = torch.randn(V, D, dtype=F64, requires_grad=True)
    labels = torch.randint(0, V, (rows, length))
    old_logp = -torch.rand(rows, length, dtype=F64) * 3
    mask = torch.rand(rows, length) < 0.8
    mask[:, 0] = True
    return hidden, weight, labels, old_logp, torch.randn(rows, dtype=F64), mask


def loss_and_grads(step, inputs) -> list[torch.Tensor]:
    loss = step(*inputs)
    return [loss, *torch.autograd.grad(loss, inputs[:2])]


def has_cpp_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
def test_no_graph_break(step):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(*batch(4, 6))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(
        not has_cpp_compiler(), reason="Inductor on the CPU needs a C++ compiler")),
])
@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
def test_compiled_step_equals_eager(step, backend):
    torch._dynamo.reset()
    inputs = batch(4, 6)
    expected = loss_and_grads(step, inputs)
    got = loss_and_grads(torch.compile(step, fullgraph=True, backend=backend), inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
def test_one_graph_for_every_batch_shape(step):
    """dynamic=True: batches of other sizes and lengths reuse the first compiled graph."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter, dynamic=True)
    for rows, length in ((4, 6), (8, 6), (6, 9), (8, 3)):  # (sizes 0 and 1 specialise)
        inputs = batch(rows, length)
        for g, e in zip(loss_and_grads(compiled, inputs), loss_and_grads(step, inputs)):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__)
def test_cuda_graph_capture_of_a_whole_step(step):
    """The step's forward and backward captured in one CUDA graph (any host sync would
    fail the capture) and replayed on new inputs copied into the captured ones: the
    eager loss and gradients."""
    inputs = [x.detach().cuda().requires_grad_(x.requires_grad) for x in batch(4, 6)]

    def run() -> list[torch.Tensor]:
        return loss_and_grads(step, inputs)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: the kernels compiled, the caches filled
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    fresh = batch(4, 6)
    with torch.no_grad():
        for dst, src in zip(inputs, fresh):
            dst.copy_(src)
    graph.replay()
    expected = loss_and_grads(step, [x.detach().cuda().requires_grad_(x.requires_grad)
                                     for x in fresh])
    for got, want in zip(captured, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
