"""Every public op runs its kernels as `torch.library` custom ops (``rlhf_fast::*``):
`torch.library.opcheck` passes for each op call, ``torch.compile(fullgraph=True)`` traces
each public op with values and gradients equal to eager, and the default GPU path reads no
tensor value on the host (no device sync: CUDA-graph capturable)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from op_calls import CALLS, Inputs, public_op_names
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_fast.benchmarks.memory import launches_skipped
from rlhf_fast.ops.library import NAMESPACE, launch_within, registered_ops

F64 = torch.float64


class CustomOpCalls(TorchDispatchMode):
    """Records every ``rlhf_fast::*`` op called within the block, with its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == NAMESPACE:
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def run_with_grads(name: str, device: str = "cpu", dtype: torch.dtype = F64
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    run, leaves = CALLS[name](Inputs(device, dtype))
    outputs = run()
    grads = list(torch.autograd.grad(sum(out.sum() for out in outputs), leaves)) \
        if leaves else []
    return outputs, grads


def test_every_public_op_has_a_call():
    assert {name.split("[")[0] for name in CALLS} == public_op_names()


@pytest.mark.parametrize("name", list(CALLS))
def test_the_kernels_run_as_custom_ops(name):
    """Forward and backward: every launch is inside a custom op (no autograd.Function)."""
    with CustomOpCalls() as recorded:
        outputs, _ = run_with_grads(name)
    assert recorded.calls, f"{name} called no {NAMESPACE} op"
    for out in outputs:
        assert out.grad_fn is None or "Function" not in type(out.grad_fn).__name__ \
            or type(out.grad_fn).__name__.startswith("GeneratedBackwardFor_")


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", list(CALLS))
def test_opcheck(name, dtype):
    """`torch.library.opcheck` (schema, fake implementation, autograd registration, AOT
    dispatch with dynamic shapes) on each custom-op call the public op makes, forward and
    backward, with the arguments it made them with."""
    with CustomOpCalls() as recorded:
        run_with_grads(name, dtype=dtype)
    assert recorded.calls
    for op, args, kwargs in recorded.calls:
        if "_backward" in op.__name__:  # the gradients it computes are not differentiable
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("name", list(CALLS))
def test_compiles_fullgraph_equal_to_eager(name):
    """``torch.compile(fullgraph=True)`` raises on any graph break; the compiled op gives
    the eager values and gradients (AOTAutograd traces the registered backward)."""
    torch._dynamo.reset()
    run, leaves = CALLS[name](Inputs("cpu", F64))
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    for fn in (run, compiled):
        torch.manual_seed(0)  # clip_cov draws tokens at random
        outputs = fn()
        grads = torch.autograd.grad(sum(out.sum() for out in outputs), leaves) \
            if leaves else ()
        if fn is run:
            expected = (outputs, grads)
    for got, want in zip((*outputs, *grads), (*expected[0], *expected[1])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)


_SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select",
          "unique_dim", "_unique2", "unique_consecutive", "equal", "allclose",
          "repeat_interleave"}


class NoHostSync(TorchDispatchMode):
    """Fails on every op that reads a tensor's values on the host or sizes its output by
    them (a device sync on a GPU), and on every copy to the CPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
        to_cpu = name in ("_to_copy", "copy_") and (
            kwargs.get("device") == torch.device("cpu")
            or (name == "copy_" and args[0].device.type == "cpu"))
        if name in _SYNCS or bool_index or to_cpu:
            raise AssertionError(f"host sync: {func} on the default GPU path")
        if func.namespace == NAMESPACE:  # inside the op too: its launcher, run in the mode
            return launch_within(self, func, args, kwargs)
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", list(CALLS))
def test_no_host_sync_on_the_gpu_path(name):
    """The default path of a GPU tensor, forward and backward, on meta tensors (shapes
    only: any value read on the host raises) with the Triton launches skipped, under a mode
    that also fails on every sync-making op: nothing waits for the device."""
    with launches_skipped(), NoHostSync():
        outputs, grads = run_with_grads(name, device="meta", dtype=torch.float32)
    assert all(t.device.type == "meta" for t in (*outputs, *grads))


def test_every_registered_op_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [op for op in registered_ops() if f"`{op}`" not in readme]
    assert not missing, f"README's custom-op table lacks {missing}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("name", list(CALLS))
def test_cuda_graph_capture(name):
    """Forward and backward of each op captured in one CUDA graph and replayed: equal to
    eager (capture fails on any host sync)."""
    run, leaves = CALLS[name](Inputs("cuda", torch.float32))

    def step() -> list[torch.Tensor]:
        outputs = run()
        grads = torch.autograd.grad(sum(out.sum() for out in outputs), leaves) \
            if leaves else ()
        return [*outputs, *grads]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: compile the kernels, fill the caches
            expected = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        torch.testing.assert_close(got, want, equal_nan=True)
