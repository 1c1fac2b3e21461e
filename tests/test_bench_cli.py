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

RUN_CLI = "import sys; from rlhf_fast.cli import main; sys.exit(main(sys.argv[1:]))"


def _cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("RLHF_FAST_BACKEND", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def test_bench_logprobs_quick_on_cpu(tmp_path: Path) -> None:
    out_dir = tmp_path / "results"
    work_dir = tmp_path / "cwd"
    work_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "bench", "logprobs", "--quick", "--out", str(out_dir)],
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
    for provider in ("rlhf_fast", "eager"):
        mine = [r for r in rows if r["provider"] == provider]
        assert mine, f"no rows for {provider}"
        for row in mine:
            assert row["status"] == "ok", row
            assert row["median_ms"] is not None and row["median_ms"] > 0, row
    assert {r["mode"] for r in rows if r["provider"] == "rlhf_fast"} >= {"fwd", "fwd+bwd"}
    assert {r.get("variant") for r in rows} == {"logp", "logp+entropy"}

    compiled = [r for r in rows if r["provider"] == "compile"]
    assert compiled, "the compile provider must be listed"
    for row in compiled:
        assert row["status"].startswith("skipped: "), row
        assert len(row["status"]) > len("skipped: "), row
        assert row["median_ms"] is None, row

    markdown = (out_dir / "logprobs.md").read_text()
    assert "| rlhf_fast |" in markdown and "| eager |" in markdown
    assert "say nothing about GPU speed" in proc.stdout, log
