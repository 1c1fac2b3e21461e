"""`rlhf-fast bench` end to end on the CPU: it runs, writes its results and says what they mean.

The bench runs in a subprocess, as a user would run it: without TRITON_INTERPRET (which
the tests' conftest sets in this process), so `rlhf_fast` runs its CPU fallback, and
without any visible GPU, so the CPU path is what is checked wherever CI runs. The
subprocess starts in a scratch directory, which also checks that the suites and their
conftest are found from the installed package, not from the current directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN_CLI = "import sys; from rlhf_fast.cli import main; sys.exit(main(sys.argv[1:]))"


def _cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("RLHF_FAST_BACKEND", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def test_bench_logprobs_quick_on_cpu(tmp_path: Path) -> None:
    """The log-prob suite on the CPU fallback, its first quick size (``-k``: the whole
    quick run is three sizes)."""
    out_dir = tmp_path / "results"
    work_dir = tmp_path / "cwd"
    work_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "bench", "logprobs", "--quick", "--out", str(out_dir),
         "-k", "64x1000"],
        cwd=work_dir,
        env=_cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log
    assert (out_dir / "logprobs.json").is_file(), log
    assert (out_dir / "logprobs.md").is_file(), log

    results = json.loads((out_dir / "logprobs.json").read_text())
    assert results["info"]["gpu"] is False
    rows = results["rows"]
    # TRL picks its PyTorch fallback off CUDA: its rows run and pass the gate here too.
    for provider in ("rlhf_fast", "eager", "trl"):
        mine = [r for r in rows if r["provider"] == provider]
        assert mine, f"no rows for {provider}"
        for row in mine:
            assert row["status"] == "ok", row
            assert row["median_ms"] is not None and row["median_ms"] > 0, row
    assert {r["mode"] for r in rows if r["provider"] == "rlhf_fast"} >= {"fwd", "fwd+bwd"}
    assert {r.get("variant") for r in rows} == {"logp", "logp+entropy"}

    compiled = [r for r in rows if r["provider"].startswith("compile")]
    assert {r["provider"] for r in compiled} == {"compile", "compile-rlhf_fast"}
    for row in compiled:
        assert row["status"].startswith("skipped: "), row
        assert len(row["status"]) > len("skipped: "), row
        assert row["median_ms"] is None, row

    markdown = (out_dir / "logprobs.md").read_text()
    assert "| rlhf_fast |" in markdown and "| eager |" in markdown
    assert "say nothing about GPU speed" in proc.stdout, log


def test_bench_token_divergence_quick_on_cpu(tmp_path: Path) -> None:
    """The distillation suite on the CPU fallback, its first quick size (``-k``: the whole
    quick run is three sizes): ours and eager gated and timed for every divergence,
    compile and Liger-Kernel (no GPU, no interpreter here) skipped, saying why."""
    out_dir = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "bench", "token_divergence", "--quick", "--out",
         str(out_dir), "-k", "64x1000"],
        cwd=tmp_path, env=_cpu_env(), capture_output=True, text=True, timeout=600,
    )
    log = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log
    results = json.loads((out_dir / "token_divergence.json").read_text())
    assert results["info"]["gpu"] is False
    rows = results["rows"]
    status = {(r["variant"], r["mode"], r["provider"]): r["status"] for r in rows}
    assert len(status) == len(rows) == 3 * (3 * 6 - 1)  # variants x (modes x providers - 1)
    assert {r["variant"] for r in rows} == {"jsd", "forward_kl", "reverse_kl"}
    for row in rows:
        assert row["shape"] == [64, 1000] and row["dtype"] == "bfloat16", row
        if row["provider"] in ("rlhf_fast", "rlhf_fast-inplace", "eager"):
            assert row["status"] == "ok", row
            assert row["median_ms"] is not None and row["median_ms"] > 0, row
            assert max(row["rel_err"].values()) <= 1e-2, row
            passes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[row["mode"]]
            assert row["bytes_moved"] == passes * 64 * 1000 * 2, row
        elif row["provider"] == "liger":
            assert row["status"] == ("skipped: liger_kernel runs on CUDA (or "
                                     "TRITON_INTERPRET=1) only"), row
        else:
            assert row["status"] == "skipped: torch.compile skipped in CPU quick mode", row
    markdown = (out_dir / "token_divergence.md").read_text()
    assert "| token_divergence (forward_kl) | 64x1000 | bfloat16 | rlhf_fast | fwd |" in markdown
    assert "say nothing about GPU speed" in proc.stdout, log


def test_bench_linear_token_divergence_quick_on_cpu(tmp_path: Path) -> None:
    """Distillation from hidden states on the CPU fallback, its first quick size (``-k``):
    ours and eager gated and timed for every divergence with their GEMM counts, compile
    and Liger-Kernel's fused linear JSD (no GPU, no interpreter here) skipped, saying
    why."""
    out_dir = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "bench", "linear_token_divergence", "--quick",
         "--out", str(out_dir), "-k", "32x16x100"],
        cwd=tmp_path, env=_cpu_env(), capture_output=True, text=True, timeout=600,
    )
    log = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log
    results = json.loads((out_dir / "linear_token_divergence.json").read_text())
    assert results["info"]["gpu"] is False
    rows = results["rows"]
    status = {(r["variant"], r["mode"], r["provider"]): r["status"] for r in rows}
    assert len(status) == len(rows) == 3 * 2 * 5  # variants x modes x providers
    assert {r["variant"] for r in rows} == {"jsd", "forward_kl", "reverse_kl"}
    gemm_flops = 2 * 32 * 16 * 100  # 2 N D V
    for row in rows:
        assert row["shape"] == [32, 16, 100] and row["dtype"] == "bfloat16", row
        if row["provider"] in ("rlhf_fast", "eager"):
            assert row["status"] == "ok", row
            assert row["median_ms"] is not None and row["median_ms"] > 0, row
            assert set(row["rel_err"]) == ({"divergence"} if row["mode"] == "fwd" else
                                           {"divergence", "grad_hidden", "grad_weight"}), row
            assert max(row["rel_err"].values()) <= 2e-2, row
            gemms = {("fwd", "rlhf_fast"): 2, ("fwd+bwd", "rlhf_fast"): 6,
                     ("fwd", "eager"): 2, ("fwd+bwd", "eager"): 4}
            assert row["gemms"] == gemms[row["mode"], row["provider"]], row
            floor = {"fwd": 2, "fwd+bwd": 4}[row["mode"]]
            assert row["floor_flops"] == floor * gemm_flops, row
            assert 0 < row["counted_tokens"] < 32, row
        elif row["provider"] == "liger":
            assert row["status"] == ("skipped: liger_kernel runs on CUDA (or "
                                     "TRITON_INTERPRET=1) only"), row
        else:
            assert row["status"] == "skipped: torch.compile skipped in CPU quick mode", row
    markdown = (out_dir / "linear_token_divergence.md").read_text()
    assert ("| linear_token_divergence (forward_kl) | 32x16x100 | bfloat16 | rlhf_fast | fwd |"
            in markdown)
    assert "say nothing about GPU speed" in proc.stdout, log


#: The preference-loss suites from hidden states, one per op.
PREFERENCE_SUITES = ("simpo_loss", "cpo_loss", "orpo_loss", "kto_loss")


def test_bench_preference_losses_quick_on_cpu(tmp_path: Path) -> None:
    """SimPO, CPO, ORPO and KTO from hidden states on the CPU fallback, their first quick
    size (``-k``: 2 pairs, or 4 KTO examples, of 8 tokens): ours, Liger-Kernel's chunked
    losses (PyTorch code: they run here) and eager gated and timed, with their GEMM
    counts (KTO's reference model one more); compile skipped."""
    out_dir = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "bench", *PREFERENCE_SUITES, "--quick", "--out",
         str(out_dir), "-k", "4x8x16x100"],
        cwd=tmp_path, env=_cpu_env(), capture_output=True, text=True, timeout=600,
    )
    log = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log
    gemm_flops = 2 * 32 * 16 * 100  # 2 N D V, N = 4 rows x 8 tokens
    from rlhf_fast.benchmarks import peers, preference

    liger_forward_alone = [peers.liger_chunked_skips_gradient(*base) for base in (
        preference.LIGER_PAIRED_BASE, preference.LIGER_UNPAIRED_BASE)]
    for op in PREFERENCE_SUITES:
        rows = json.loads((out_dir / f"{op}.json").read_text())["rows"]
        assert {(r["mode"], r["provider"]) for r in rows} == {
            (m, p) for m in ("fwd", "fwd+bwd") for p in ("rlhf_fast", "compile-rlhf_fast",
                                                         "liger", "eager", "compile")}, op
        reference_model = 1 if op == "kto_loss" else 0
        for row in rows:
            assert row["op"] == op and row["shape"] == [4, 8, 16, 100], row
            if row["provider"].startswith("compile"):
                assert row["status"] == "skipped: torch.compile skipped in CPU quick mode"
                continue
            assert row["status"] == "ok", row
            assert row["median_ms"] is not None and row["median_ms"] > 0, row
            assert set(row["rel_err"]) == ({"loss"} if row["mode"] == "fwd" else
                                           {"loss", "grad_hidden", "grad_weight"}), row
            assert max(row["rel_err"].values()) <= 2e-2, row
            gemms = {"fwd": 1, "fwd+bwd": 4 if row["provider"] == "rlhf_fast" else 3}
            if row["provider"] == "liger" and not liger_forward_alone[op == "kto_loss"]:
                gemms["fwd"] = 3  # a release computing its gradient regardless
            assert row["gemms"] == gemms[row["mode"]] + reference_model, row
            floor = {"fwd": 1, "fwd+bwd": 3}[row["mode"]] + reference_model
            assert row["floor_flops"] == floor * gemm_flops, row
            assert 0 < row["answer_tokens"] < 32, row
        assert f"| {op} | 4x8x16x100 | bfloat16 | liger | fwd+bwd |" in (
            out_dir / f"{op}.md").read_text()


def test_bench_e2e_quick_on_cpu_writes_table_summary_and_plot(tmp_path: Path) -> None:
    """The end-to-end suite (the trainers' DPO step and PPO update, fused / logits /
    eager) in CPU quick mode: every provider gated and timed, tokens/s and the summary
    in the table, a PNG beside it."""
    out_dir = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "bench", "e2e", "--quick", "--out", str(out_dir)],
        cwd=tmp_path, env=_cpu_env(), capture_output=True, text=True, timeout=600,
    )
    log = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log
    rows = json.loads((out_dir / "e2e.json").read_text())["rows"]
    assert {(r["mode"], r["provider"]) for r in rows} == {
        (m, p) for m in ("dpo-step", "ppo-update")
        for p in ("rlhf_fast-fused", "rlhf_fast-logits", "eager")}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["rel_err"]["answer_logps"] <= 1e-4, row
        assert row["tokens"] == 8 * 32 and row["tokens_per_s"] > 0, row
        assert row["frac_roofline"] > 0, row
    # one GEMM rate measured per run divides every row's model FLOP/s (on the CPU a bf16
    # rate against fp32 steps: no bound, so no "< 1" here)
    rates = [r["model_tflops"] / r["frac_roofline"] for r in rows]
    assert max(rates) == pytest.approx(min(rates), rel=1e-9), rates
    markdown = (out_dir / "e2e.md").read_text()
    assert "| tokens/s |" in markdown
    assert markdown.count("\n- e2e 8x32 fp32 ") == 2  # one summary line per mode
    assert (out_dir / "e2e.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_flags_rows_slower_than_a_peer_or_far_from_roofline() -> None:
    from rlhf_fast.benchmarks import report

    def row(provider: str, median: float, frac: float | None, shape=(4, 8)) -> dict:
        timing = {"median_ms": median, "p25_ms": median, "p75_ms": median}
        return report.make_row(op="x", shape=shape, dtype="bf16", provider=provider,
                               mode="fwd", timing=timing, frac_roofline=frac)

    lines = report.summarize([
        row("rlhf_fast", 2.0, 0.9), row("rlhf_fast-inplace", 1.0, 0.8), row("eager", 3.0, None),
        row("rlhf_fast", 2.0, 0.5, (8, 8)), row("compile", 1.0, None, (8, 8)),
    ])
    assert lines == [
        "x 4x8 bf16 fwd: rlhf_fast-inplace 1.000 ms, 3.00x vs eager, 0.80 of roofline",
        "x 8x8 bf16 fwd: rlhf_fast 2.000 ms, 0.50x vs compile, 0.50 of roofline  <- SLOWER "
        "than compile; further than 1.5x from roofline",
    ]


def test_cpu_fallback_timings_carry_no_verdict() -> None:
    """Timings of the CPU fallback at tiny shapes say nothing about speed: no SLOWER-than
    flag and no roofline fraction from them."""
    from rlhf_fast.benchmarks import report

    timing = {"median_ms": 2.0, "p25_ms": 2.0, "p75_ms": 2.0}
    rows = [report.make_row(op="x", shape=(4, 8), dtype="bf16", provider=provider, mode="fwd",
                            timing=timing | {"median_ms": ms}, frac_roofline=0.1)
            for provider, ms in (("rlhf_fast", 2.0), ("eager", 1.0))]
    assert report.summarize(rows, verdicts=False) == [
        "x 4x8 bf16 fwd: rlhf_fast 2.000 ms, 0.50x vs eager"]
    assert "SLOWER" in report.summarize(rows)[0]


def test_headline_cases_are_one_size_one_mode_no_compile() -> None:
    """`rlhf-fast bench --headline`: per suite the headline size in its most complete mode,
    every provider but the compiled ones; every suite contributes, rlhf_fast first."""
    import importlib

    from rlhf_fast.cli import known_ops

    total = 0
    for name in known_ops():
        suite = importlib.import_module(f"rlhf_fast.benchmarks.bench_{name}").SUITE
        for quick in (False, True):
            cases = suite.headline_cases(quick)
            assert cases and cases[0].provider.startswith("rlhf_fast"), name
            sizes = suite.quick_sizes if quick else suite.sizes
            assert {(c.shape, c.dtype) for c in cases} == {sizes[0]}
            assert {c.mode for c in cases} == {"fwd+bwd" if "fwd+bwd" in suite.modes
                                               else suite.modes[-1]}
            assert not any(c.provider.startswith("compile") for c in cases)
            assert {c.variant for c in cases} == set(suite.headline_variants or
                                                     suite.variants), name
        total += len(suite.headline_cases(True))
    assert total <= 80  # a short run: the README's estimate counts on it (75 cases)


def test_bench_grpo_quick_on_cpu_lists_the_gpu_only_peer_as_skipped(tmp_path: Path) -> None:
    """The GRPO-from-logits suite on the CPU fallback: ours and eager gated and timed;
    Liger-Kernel (installed, but no GPU and no interpreter here) skipped, saying why."""
    out_dir = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "bench", "grpo", "--quick", "--out", str(out_dir)],
        cwd=tmp_path, env=_cpu_env(), capture_output=True, text=True, timeout=600,
    )
    log = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log
    rows = json.loads((out_dir / "grpo.json").read_text())["rows"]
    status = {(tuple(r["shape"]), r["mode"], r["provider"]): r["status"] for r in rows}
    assert len(status) == 2 * (3 * 6 - 1)  # shapes x (modes x providers - inplace fwd)
    for (_, _, provider), text in status.items():
        if provider in ("rlhf_fast", "rlhf_fast-inplace", "eager"):
            assert text == "ok", (provider, text)
        elif provider == "liger":
            assert text == "skipped: liger_kernel runs on CUDA (or TRITON_INTERPRET=1) only"
        else:
            assert text == "skipped: torch.compile skipped in CPU quick mode"
    assert (out_dir / "grpo.md").is_file() and (out_dir / "grpo.png").is_file()


def _fake_results(directory: Path, gpu: bool) -> None:
    """Two ops' results as `rlhf-fast bench` writes them, with a plot for one."""
    from rlhf_fast.benchmarks import report

    info = {"device": "NVIDIA H100 80GB HBM3" if gpu else "cpu", "driver": "570.1",
            "torch": "2.11.0", "triton": "3.6.0", "date": "2026-11-25", "gpu": gpu}

    def row(op: str, provider: str, median: float, peak_mib: int, **extra) -> dict:
        timing = {"median_ms": median, "p25_ms": median, "p75_ms": median}
        return report.make_row(op=op, shape=(8, 1024), dtype="bf16", provider=provider,
                               mode="fwd+bwd", timing=timing, peak_bytes=peak_mib * 2**20,
                               **extra)

    directory.mkdir(parents=True)
    for name, rows in {
        "grpo": [row("grpo", "rlhf_fast", 2.0, 1024, frac_roofline=0.8),
                 row("grpo", "liger", 4.0, 2048), row("grpo", "eager", 9.0, 9000)],
        "gae": [row("gae", "rlhf_fast", 1.0, 1, frac_roofline=0.5),
                row("gae", "compile", 0.5, 1)],
    }.items():
        payload = {"name": name, "info": info, "rows": rows}
        (directory / f"{name}.json").write_text(json.dumps(payload))
    (directory / "grpo.png").write_bytes(b"\x89PNG fake")


def test_report_rewrites_only_the_readme_benchmark_block(tmp_path: Path) -> None:
    from rlhf_fast.cli import main

    results = tmp_path / "benchmarks" / "results"
    _fake_results(results, gpu=True)
    readme = tmp_path / "README.md"
    before, after = "# title\n\ntext before\n", "\ntext after\n"
    readme.write_text(before + "<!-- rlhf-fast:benchmarks:begin -->\nold table\n"
                      "<!-- rlhf-fast:benchmarks:end -->" + after)
    assert main(["report", "--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after)
    assert "old table" not in text and "CPU fallback" not in text
    assert "NVIDIA H100 80GB HBM3" in text and "triton 3.6.0" in text
    assert ("| grpo | 8x1024 bf16 | fwd+bwd | rlhf_fast | 2.000 | liger | 4.000 | 2.00x "
            "| 1024 / 2048 | 0.80 |") in text
    assert ("| gae | 8x1024 bf16 | fwd+bwd | rlhf_fast | 1.000 | compile | 0.500 | 0.50x "
            "| 1 / 1 | 0.50 |") in text
    assert "![grpo](benchmarks/results/grpo.png)" in text and "![gae]" not in text
    main(["report", "--results", str(results), "--readme", str(readme)])
    assert readme.read_text() == text  # idempotent


@pytest.mark.parametrize("exit_code", [0, 1])
def test_bench_readme_writes_the_block_after_a_run_that_passed(
        tmp_path: Path, monkeypatch, exit_code: int) -> None:
    """`rlhf-fast bench --headline --readme README.md` writes the results and then the
    README's block from them (the run itself stubbed: it writes two ops' results); a
    failed run leaves the README as it was."""
    from rlhf_fast.cli import main

    results = tmp_path / "benchmarks" / "results"
    readme = tmp_path / "README.md"
    before = "<!-- rlhf-fast:benchmarks:begin -->\nold table\n<!-- rlhf-fast:benchmarks:end -->\n"
    readme.write_text(before)

    def run(args: list[str]) -> int:
        assert "--headline" in args and args[args.index("--bench-out") + 1] == str(results)
        _fake_results(results, gpu=True)
        return exit_code

    monkeypatch.setattr(pytest, "main", run)
    code = main(["bench", "--headline", "--out", str(results), "--readme", str(readme)])
    assert code == exit_code
    if exit_code == 0:
        assert "old table" not in readme.read_text() and "grpo" in readme.read_text()
    else:
        assert readme.read_text() == before


def test_report_says_when_results_come_from_the_cpu(tmp_path: Path, capsys) -> None:
    from rlhf_fast.cli import main

    _fake_results(tmp_path / "results", gpu=False)
    assert main(["report", "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**These results come from the CPU fallback")


def test_report_imports_neither_pytest_nor_the_suites(tmp_path: Path) -> None:
    """`rlhf-fast report` only reads results: it runs where pytest is not installed."""
    _fake_results(tmp_path / "results", gpu=True)
    check = (
        "import sys; from rlhf_fast.cli import main; code = main(sys.argv[1:]); "
        "print('imported:', sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pytest', '_pytest', 'pytest_benchmark') or m.startswith('rlhf_fast.benchmarks.')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", check, "report", "--results", str(tmp_path / "results")],
        cwd=tmp_path, env=_cpu_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "| grpo | 8x1024 bf16 |" in proc.stdout
    assert "imported: ['rlhf_fast.benchmarks.report']" in proc.stdout, proc.stdout[-2000:]


def test_bench_names_are_the_public_ops_and_two_workloads() -> None:
    """One name per op: `rlhf-fast bench <name>` runs ``bench_<name>.py``, named after
    the public op it measures; ``grpo`` (log-probs + PPO loss from logits) and ``e2e``
    (the trainers' steps) are the workloads."""
    import rlhf_fast
    from rlhf_fast.cli import known_ops

    names = set(known_ops())
    assert names == {"cpo_loss", "dpo_loss", "e2e", "gae", "group_advantages", "grpo",
                     "kto_loss", "linear_dpo_loss", "linear_logprobs", "linear_ppo_loss",
                     "linear_token_divergence", "logprobs", "masked_mean", "masked_whiten",
                     "optimal_token_baseline", "orpo_loss", "ppo_loss", "simpo_loss",
                     "token_divergence"}
    for name in names - {"grpo", "e2e"}:
        assert callable(getattr(rlhf_fast, name, None)), name


def test_no_suite_imports_another() -> None:
    """What two suites share lives in a module that is not a suite."""
    import ast

    from rlhf_fast.cli import known_ops

    suites = {f"bench_{name}" for name in known_ops()}
    for name, path in known_ops().items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                imported |= {(node.module or "").rsplit(".", 1)[-1]} | {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name.rsplit(".", 1)[-1] for a in node.names}
        assert not imported & suites, (name, imported & suites)


def test_report_errors_name_what_is_missing(tmp_path: Path, capsys) -> None:
    import pytest

    from rlhf_fast.cli import main

    results = tmp_path / "results"
    _fake_results(results, gpu=True)
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--results", str(results), "--readme", str(readme)])
    assert exit_info.value.code == 2
    assert "<!-- rlhf-fast:benchmarks:begin -->" in capsys.readouterr().err
    assert readme.read_text() == "no markers here\n"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["report", "--results", str(tmp_path / "empty")])
    assert "no benchmark results (<op>.json)" in capsys.readouterr().err


def test_bench_k_runs_only_the_selected_cases(tmp_path: Path) -> None:
    """`-k` narrows a tuning rerun to some providers / modes; the results hold those only."""
    out_dir = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "bench", "ppo_loss", "--quick", "--out", str(out_dir),
         "-k", "rlhf_fast and not compile and fwd+bwd and not gspo"],
        cwd=tmp_path, env=_cpu_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = json.loads((out_dir / "ppo_loss.json").read_text())["rows"]
    assert {(r["provider"], r["mode"], r.get("variant")) for r in rows} == {
        ("rlhf_fast", "fwd+bwd", None)}
    assert len(rows) == 2  # one per quick shape
    assert "rlhf-fast report --results" in proc.stdout
