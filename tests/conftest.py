"""Test setup: the Triton kernels run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported anywhere, hence at the top of the
conftest, which pytest imports before any test module.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("RLHF_FAST_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A fresh random seed per test (set RLHF_FAST_TEST_SEED to replay one)."""
    seed = int(os.environ.get("RLHF_FAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"replay with RLHF_FAST_TEST_SEED={seeds[0]}"))


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled (float) or extreme-value (int) tensors, so an
    output element a kernel forgets to write fails the comparison instead of passing
    by luck."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    return poisoned


@pytest.fixture
def poisoned(poisoned_empty, monkeypatch):
    """`poisoned_empty`, and torch.empty_like NaN-filled too (for float tensors: the
    gradients an op allocates like its inputs)."""
    real_empty_like = torch.empty_like

    def poisoned_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty_like", poisoned_like)
