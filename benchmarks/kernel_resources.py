"""Registers, spills and shared memory of every Triton kernel, compiled for a GPU that is
not there.

Speed needs a GPU; some of its causes do not. This compiles each kernel the public ops
launch, at the configurations they pick for the headline shapes (vocab 151936 and 128256,
T = 4096, ...), for an NVIDIA target (default sm_90, the H100 / H200), with Triton's own
compiler and the ptxas it bundles, on any machine, and reads the resource usage of the
resulting cubin with the bundled cuobjdump:

* ``regs``: registers per thread (255 at most; more than ~128 halves the warps an SM
  can hold, which a memory-bound kernel feels),
* ``local``: bytes of local memory per thread, i.e. register spills (should be 0),
* ``shared``: bytes of shared memory per program,
* ``warps_per_sm``: how many of its warps one SM can hold at once (occupancy), from
  those and the SM's limits,

plus the launch configuration (constexprs such as the block sizes, num_warps). It runs
the ops for real up to the kernel launches, which are compiled and not run: a stand-in
driver reports the target, and `rlhf_fast.ops.dispatch.use_triton` says yes on the CPU.

Run it without TRITON_INTERPRET (interpreted kernels are not compiled):

    python -m rlhf_fast.benchmarks.kernel_resources [--arch 90] [--json]

Triton internals it leans on (`triton.runtime.driver.set_active`, `JITFunction.run`'s
``warmup`` flag, `CompiledKernel.asm["cubin"]`) are stable across Triton 3.x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

#: cuobjdump's resource line, e.g. "REG:48 STACK:0 SHARED:1024 LOCAL:0 ...".
RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
#: nvdisasm's lines: an instruction ("/*0120*/  @!P0 BRA `(.L_x_2) ;"), a label (".L_x_2:").
SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+\S")
SASS_LABEL = re.compile(r"^\.(L_x_\d+):")
SASS_BRANCH = re.compile(r"\bBRA\b.*\.(L_x_\d+)\)?")
#: Registers above which an sm_90 SM holds fewer than 16 warps of 128-thread programs.
REGS_WARNING = 128
#: Per-SM limits by compute capability x 10: (max resident warps, max resident
#: programs, shared memory bytes). 64K 32-bit registers on all of them.
SM_LIMITS = {80: (64, 32, 167936), 86: (48, 16, 102400), 89: (48, 24, 102400),
             90: (64, 32, 233472), 100: (64, 32, 233472)}
REGISTERS_PER_SM = 65536
#: Shared memory the driver reserves per program (sm_80 and later).
RESERVED_SHARED = 1024
#: Peak thread instructions per second of an H100 SXM or H200 (the same SM): 132 SMs at
#: 1.98 GHz, each issuing 4 warp instructions (of 32 threads) per clock.
ISSUE_RATE = 132 * 1.98e9 * 4 * 32
#: Their peak memory bandwidth, bytes per second.
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def resident_warps(arch: int, regs: int, num_warps: int, shared: int) -> int:
    """Warps of this kernel one SM holds at once (the occupancy limit of its registers,
    shared memory and warps per program). Registers are allocated per warp, in units of
    256 (i.e. per thread, rounded up to a multiple of 8)."""
    max_warps, max_programs, shared_per_sm = SM_LIMITS[arch]
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGISTERS_PER_SM // (regs_per_warp * num_warps)
    by_shared = shared_per_sm // (shared + RESERVED_SHARED)
    programs = min(by_regs, by_shared, max_programs, max_warps // num_warps)
    return programs * num_warps


class _TargetOnlyDriver:
    """Enough of a Triton driver to compile for `target`: nothing can be launched."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[list[tuple[str, Any, dict[str, Any]]]]:
    """Within the block, every Triton launch compiles for ``sm_<arch>`` and is not run;
    yields the list that collects (kernel name, compiled kernel, its upper-case
    constexpr arguments such as BLOCK_T) per launch."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernel_resources needs TRITON_INTERPRET unset: interpreted "
                           "kernels are not compiled")
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from rlhf_fast.ops import dispatch

    compiled: list[tuple[str, Any, dict[str, Any]]] = []
    run = jit.JITFunction.run

    def compile_instead(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        config = {k: v for k, v in kwargs.items() if k.isupper()}
        compiled.append((self.fn.__name__, kernel, config))
        return kernel

    patched = [(jit.JITFunction, "run", compile_instead)]
    patched += [(module, "use_triton", lambda tensor: True) for module in _op_modules(dispatch)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    previous_driver = getattr(driver, "_active", None)  # None: not created yet (no GPU)
    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    try:
        for owner, name, value in patched:
            setattr(owner, name, value)
        yield compiled
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        if previous_driver is not None:
            driver.set_active(previous_driver)


def _op_modules(dispatch: Any) -> list[Any]:
    """`dispatch` and every rlhf_fast.ops module that imported its use_triton."""
    import rlhf_fast  # noqa: F401 - imports the op modules

    return [dispatch] + [m for name, m in sorted(sys.modules.items())
                         if name.startswith("rlhf_fast.ops.") and hasattr(m, "use_triton")]


def _run_on_cubin(kernel: Any, tool: str, *args: str) -> str:
    """The output of one of Triton's bundled CUDA tools on the kernel's cubin."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(path), *args, str(cubin)], capture_output=True, text=True,
                              check=True).stdout


def main_loop_instructions(sass: str) -> int:
    """SASS instructions in one iteration of a kernel's main loop: of the innermost loops
    (a label, and a branch back to it with no other loop inside) that load from global
    memory (LDG) and hold at least a fifth of the kernel's instructions (not a scalar
    loop over a few per-row values beside a one-tile kernel), the longest; 0 for a kernel
    without one."""
    lines, labels, loops = [], {}, []
    for line in sass.splitlines():
        label = SASS_LABEL.match(line)
        if label:
            labels[label.group(1)] = len(lines)
        elif SASS_INSTRUCTION.match(line):
            branch = SASS_BRANCH.search(line)
            # (a branch to itself is the trap every kernel ends with, not a loop)
            if branch and labels.get(branch.group(1), len(lines)) < len(lines):
                loops.append((labels[branch.group(1)], len(lines)))
            lines.append(line)
    innermost = [(a, b) for a, b in loops
                 if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)
                 and any(re.search(r"\bLDG\b", line) for line in lines[a:b + 1])
                 and 5 * (b - a + 1) >= kernel_instructions(sass)]
    return max((b - a + 1 for a, b in innermost), default=0)


def kernel_instructions(sass: str) -> int:
    """SASS instructions of a whole kernel, its alignment NOPs and the final trap aside:
    one program's work where a kernel has no loop (one tile per program)."""
    count = 0
    for line in sass.splitlines():
        if SASS_INSTRUCTION.match(line) and not re.search(r"\bNOP\b", line):
            count += 1
    return count - 1  # the trap: a branch to itself after EXIT


def per_element(config: dict[str, Any], num_warps: int, loop: int) -> float | None:
    """Instructions per element of the loop: each iteration covers the tile of the
    kernel's BLOCK_* sizes, spread over its 32 * num_warps threads."""
    tile = math.prod(v for k, v in config.items() if k.startswith("BLOCK"))
    if not loop or tile <= 1:
        return None
    return round(loop * 32 * num_warps / tile, 2)


def streamed_bytes(kernel: str, config: dict[str, Any]) -> int | None:
    """Bytes per element the main loop of `kernel` loads and stores at the workloads'
    dtypes (bf16 logits, fp32 [B, T] tensors, 1-byte masks), read off its loads and
    stores; None for the kernels over per-row or per-group values."""
    c = config.get
    policy_inputs = 3 + (c("KL_EST", 0) != 0) + bool(c("HAS_IS")) + (c("POLICY") == 10)
    per_element = {
        "_logprobs_fwd_kernel": 2,                    # the logits
        "_logprobs_bwd_kernel": 4,                    # the logits, their gradient
        "_divergence_fwd_kernel": 4,                  # both models' logits (a pass)
        "_divergence_bwd_kernel": 6,                  # both, the student's gradient
        "_ppo_sequence_kernel": 1 + 4 * 3,            # mask, logp, old_logp, advantages
        "_ppo_fwd_kernel": 1 + 4 * (policy_inputs + bool(c("HAS_ENTROPY"))
                                    + 3 * bool(c("HAS_VALUE"))),
        "_ppo_bwd_kernel": 1 + 4 * (policy_inputs + 1 + bool(c("GRAD_ENTROPY"))
                                    + 4 * bool(c("GRAD_VALUE"))),
        "_ppo_token_grad_kernel": 4 * (1 + policy_inputs + 2),
        "_gae_kernel": 1 + 4 * (2 + bool(c("HAS_VALUES")) + bool(c("STORE_ADV"))),
        "_optimal_token_baseline_kernel": 1 + 4 * (3 + 2),  # 3 inputs, 2 outputs
        "_masked_partial_stats_kernel": 1 + 4,
        "_masked_mean_bwd_kernel": 1 + 4,
        "_whiten_fwd_kernel": 1 + 4 * 2,
        "_whiten_bwd_partial_kernel": 1 + 4 * 2,
        "_whiten_bwd_kernel": 1 + 4 * 3,
        "_sequence_logps_fwd_kernel": 1 + 4,
        "_sequence_logps_bwd_kernel": 1 + 4,
    }
    return per_element.get(kernel)


def issue_over_memory_time(instructions_per_element: float | None, bytes_per_element:
                           int | None, gpu: str) -> float | None:
    """The main loop's time issuing its instructions over its time moving its bytes, at
    the GPU's peak rates: below 1 the loop is memory-bound (its instructions hide behind
    the loads), above 1 issue-bound (instructions are the time)."""
    if not instructions_per_element or not bytes_per_element:
        return None
    issue = instructions_per_element / ISSUE_RATE
    return round(issue / (bytes_per_element / BANDWIDTH[gpu]), 2)


def resource_usage(kernel: Any) -> dict[str, int]:
    """regs, stack, shared (static, from the cubin) and local bytes of a compiled kernel."""
    text = _run_on_cubin(kernel, "cuobjdump", "--dump-resource-usage")
    match = RESOURCE_LINE.search(text)
    if match is None:
        raise RuntimeError(f"no resource line in cuobjdump's output:\n{text}")
    regs, stack, shared, local = (int(g) for g in match.groups())
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local}


# --------------------------------------------------------------------------- workloads


def _logprobs() -> None:
    import rlhf_fast

    for vocab in (151936, 128256):
        logits = torch.randn(4, vocab, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (4,))
        logp, entropy = rlhf_fast.logprobs(logits, labels, return_entropy=True)
        torch.autograd.grad((logp, entropy), logits, (torch.ones(4), torch.ones(4)))


def _linear_logprobs() -> None:
    import rlhf_fast

    hidden = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(128256, 64, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 128256, (8,))
    logp = rlhf_fast.linear_logprobs(hidden, weight, labels)
    torch.autograd.grad(logp.sum(), (hidden, weight))


def _token_divergence() -> None:
    import rlhf_fast

    student = torch.randn(64, 151936, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(64, 151936, dtype=torch.bfloat16)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        out = rlhf_fast.token_divergence(student, teacher, divergence=divergence)
        torch.autograd.grad(out.sum(), student)


def _ppo_inputs(b: int = 64, t: int = 4096) -> dict[str, torch.Tensor]:
    def leaf() -> torch.Tensor:
        return torch.randn(b, t, requires_grad=True)

    logp, values = leaf(), leaf()
    return dict(logp=logp, old_logp=logp.detach() + 0.1, advantages=torch.randn(b, t),
                mask=torch.rand(b, t) > 0.2, ref_logp=logp.detach(),
                entropy=torch.rand(b, t, requires_grad=True), values=values,
                old_values=values.detach(), returns=torch.randn(b, t))


def _linear_ppo_loss() -> None:
    import rlhf_fast

    x = _ppo_inputs(8, 512)
    hidden = torch.randn(8, 512, 64, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(128256, 64, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 128256, (8, 512))
    out = rlhf_fast.linear_ppo_loss(hidden, weight, labels, x["old_logp"], x["advantages"],
                                    x["mask"], ref_logp=x["ref_logp"], kl_coef=0.1)
    torch.autograd.grad(out.loss, (hidden, weight))


def _ppo_loss() -> None:
    import rlhf_fast

    x = _ppo_inputs()
    out = rlhf_fast.ppo_loss(
        x["logp"], x["old_logp"], x["advantages"], x["mask"], ref_logp=x["ref_logp"],
        kl_coef=0.1, entropy=x["entropy"], entropy_coef=0.01, values=x["values"],
        old_values=x["old_values"], returns=x["returns"], agg="seq-mean-token-mean",
    )
    out.loss.backward()


def _ppo_sequence_loss() -> None:
    import rlhf_fast

    x = _ppo_inputs()
    out = rlhf_fast.ppo_loss(x["logp"], x["old_logp"], x["advantages"], x["mask"],
                             policy_loss="gspo", agg="seq-mean-token-mean")
    out.loss.backward()


def _advantages() -> None:
    import rlhf_fast

    x = _ppo_inputs()
    rlhf_fast.gae(x["returns"], x["old_values"], x["mask"])
    rlhf_fast.group_advantages(torch.randn(512), 8)
    rlhf_fast.optimal_token_baseline(x["returns"], x["mask"], x["old_logp"],
                                     x["ref_logp"].detach(), 8)
    whitened = rlhf_fast.masked_whiten(x["values"], x["mask"])
    mean = rlhf_fast.masked_mean(x["values"], x["mask"])
    torch.autograd.grad((whitened.sum(), mean), (x["values"], x["values"]))


def _dpo() -> None:
    import rlhf_fast

    token_logp = torch.randn(16, 4096, requires_grad=True)
    seq = rlhf_fast.sequence_logps(token_logp, torch.rand(16, 4096) > 0.3)
    loss = rlhf_fast.dpo_loss(seq[:8], seq[8:], torch.randn(8), torch.randn(8)).loss
    torch.autograd.grad(loss, token_logp)


def _preference() -> None:
    import rlhf_fast

    pc, pr = (-torch.rand(4096, requires_grad=True) * 50 for _ in range(2))
    lengths = torch.randint(1, 512, (4096,))
    for loss in (rlhf_fast.simpo_loss, rlhf_fast.cpo_loss, rlhf_fast.orpo_loss):
        torch.autograd.grad(loss(pc, pr, lengths, lengths).loss, (pc, pr))
    out = rlhf_fast.kto_loss(pc, pr.detach(), torch.rand(4096) > 0.5, torch.tensor(0.1))
    torch.autograd.grad(out.loss, pc)


WORKLOADS: dict[str, Callable[[], None]] = {
    "logprobs (V 151936, 128256; bf16; logp + entropy, fwd + bwd)": _logprobs,
    "linear_logprobs (V 128256; bf16; fwd + bwd)": _linear_logprobs,
    "token_divergence (V 151936; bf16; forward_kl, reverse_kl, jsd; fwd + bwd)":
        _token_divergence,
    "ppo_loss (64 x 4096; every term; fwd + bwd)": _ppo_loss,
    "ppo_loss gspo (64 x 4096; policy term; fwd + bwd)": _ppo_sequence_loss,
    "linear_ppo_loss (8 x 512 tokens, V 128256; bf16)": _linear_ppo_loss,
    "gae, group_advantages, optimal_token_baseline, masked_whiten / mean (64 x 4096)":
        _advantages,
    "sequence_logps + dpo_loss (16 x 4096)": _dpo,
    "simpo_loss, cpo_loss, orpo_loss, kto_loss (4096 pairs / examples)": _preference,
}


def kernel_table(arch: int = 90) -> list[dict[str, Any]]:
    """One row per distinct compiled kernel: workload, kernel, launch configuration and
    resource usage on ``sm_<arch>``."""
    rows, seen = [], set()
    for workload, run in WORKLOADS.items():
        with compile_only(arch) as compiled:
            run()
        for name, kernel, config in compiled:
            key = (name, kernel.hash)
            if key in seen:
                continue
            seen.add(key)
            usage = resource_usage(kernel)
            warps = kernel.metadata.num_warps
            sass = _run_on_cubin(kernel, "nvdisasm", "-c")
            loop = main_loop_instructions(sass) or kernel_instructions(sass)
            per_elem = per_element(config, warps, loop)
            streamed = streamed_bytes(name, config)
            rows.append({"workload": workload, "kernel": name, "arch": f"sm_{arch}",
                         "num_warps": warps, "num_stages": kernel.metadata.num_stages,
                         "shared": kernel.metadata.shared, "config": config, **usage,
                         "warps_per_sm": resident_warps(arch, usage["regs"], warps,
                                                        kernel.metadata.shared),
                         "loop_instructions": loop,
                         "instructions_per_element": per_elem,
                         "bytes_per_element": streamed,
                         **{f"issue_over_memory_{gpu}":
                            issue_over_memory_time(per_elem, streamed, gpu)
                            for gpu in BANDWIDTH}})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["| kernel | workload | config | warps | regs | spill bytes | shared bytes "
             "| resident warps / SM | main loop: instructions (per element) "
             "| bytes / element | issue / memory time, H100 (H200) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        flag = " (!)" if row["local"] or row["regs"] > REGS_WARNING else ""
        config = ", ".join(f"{k}={v}" for k, v in row["config"].items() if "BLOCK" in k)
        lines.append(f"| {row['kernel']}{flag} | {row['workload']} | {config} | "
                     f"{row['num_warps']} | {row['regs']} | {row['local']} | {row['shared']} | "
                     f"{row['warps_per_sm']} | {row['loop_instructions']} "
                     f"({row['instructions_per_element']}) | {row['bytes_per_element'] or ''} | "
                     f"{_ratios(row)} |")
    return "\n".join(lines)


def _ratios(row: dict[str, Any]) -> str:
    h100, h200 = row["issue_over_memory_H100"], row["issue_over_memory_H200"]
    return "" if h100 is None else f"{h100} ({h200})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS),
                        help="compute capability x 10 (default: 90, H100 / H200)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = kernel_table(args.arch)
    print(json.dumps(rows, default=str) if args.json else format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
