"""The house rules of the layout (DESIGN.md, README "Layout"): one op, one name, in
`rlhf_fast/kernels/<op>.py`, `rlhf_fast/ops/<op>.py`, `tests/test_<op>.py` and
`benchmarks/bench_<op>.py`; small modules."""

import inspect
from pathlib import Path

import rlhf_fast

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500

#: Public ops with no kernel of their own: they launch the kernels of the ops named
COMPOSED_OF = {
    "discounted_returns": ("gae",),  # GAE's scan with lambda = 1 and no values
    "pair_logps": ("sequence_logps",),  # the sums of both answers' token log-probs
    "linear_dpo_loss": ("linear_logprobs", "sequence_logps", "dpo_loss"),
    "topk_token_divergence": ("logprobs",),  # the student's log-probs of the teacher's ids
}
#: Kernel modules that are no op's own: the @triton.jit helpers several kernels share
SHARED_KERNEL_MODULES = {"__init__", "common", "ppo_terms"}
#: Public ops with no suite of their own, and the suite that times their kernels
TIMED_IN = {
    "discounted_returns": "gae",  # GAE's kernel (lambda = 1, no values)
    "sequence_logps": "dpo_loss",  # in the fused provider's answer log-probs
    "pair_logps": "dpo_loss",  # sequence_logps of both answers
    "topk_token_divergence": "logprobs",  # the log-prob kernels on the student's logits
}


def public_ops() -> list[str]:
    return [name for name in rlhf_fast.__all__
            if inspect.isfunction(getattr(rlhf_fast, name))]


def test_no_module_is_over_500_lines():
    long = {str(path.relative_to(ROOT)): n
            for folder in ("rlhf_fast", "benchmarks") for path in (ROOT / folder).rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_public_op_has_its_name_in_the_four_places():
    for op in public_ops():
        assert (ROOT / "rlhf_fast" / "ops" / f"{op}.py").exists(), op
        assert (ROOT / "tests" / f"test_{op}.py").exists(), op
        kernel = ROOT / "rlhf_fast" / "kernels" / f"{op}.py"
        assert kernel.exists() != (op in COMPOSED_OF), op
        suite = op if op not in TIMED_IN else TIMED_IN[op]
        assert (ROOT / "benchmarks" / f"bench_{suite}.py").exists(), op
        assert (op in TIMED_IN) != (ROOT / "benchmarks" / f"bench_{op}.py").exists(), op


def test_every_kernel_and_suite_module_is_named_after_a_public_op():
    ops = set(public_ops())
    kernels = {p.stem for p in (ROOT / "rlhf_fast" / "kernels").glob("*.py")}
    assert kernels - SHARED_KERNEL_MODULES <= ops, kernels - SHARED_KERNEL_MODULES - ops
    assert all(part in ops - set(COMPOSED_OF) for parts in COMPOSED_OF.values()
               for part in parts)
    suites = {p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert suites - {"grpo", "e2e"} <= ops, suites - ops  # grpo, e2e: whole steps
