"""Bytes moved and launches per op and pass, counted through the interpreter
(`rlhf_fast.benchmarks.traffic`): within each op's budget of its floor."""

from pathlib import Path

import pytest

from rlhf_fast.benchmarks import traffic


@pytest.fixture(scope="module")
def rows():
    return {row["case"]: row for row in traffic.table()}


@pytest.mark.parametrize("name", list(traffic.CASES))
def test_bytes_moved_within_budget_of_the_floor(rows, name):
    row = rows[name]
    # below 1 the floor would be wrong (a needed byte not counted), above the budget
    # the kernels move more than they must
    assert 1.0 <= row["ratio"] <= row["budget"], row


@pytest.mark.parametrize("name", list(traffic.CASES))
def test_launches_are_the_documented_ones(rows, name):
    assert rows[name]["launches"] == rows[name]["expected_launches"]


def test_counting_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with traffic.counting():
            pass


def test_launch_traffic_by_hand():
    """Per launch, per element: read once if first loaded, written once if stored. A
    re-read, or a read of what the launch wrote, hits in cache; an in-place update (load
    then store) is a read and a write."""
    import numpy as np

    a = np.arange(4)
    assert traffic._launch_traffic([(a, 4, False), (a, 4, False)]) == 16       # re-read
    assert traffic._launch_traffic([(a, 4, False), (a, 4, True)]) == 32        # in place
    assert traffic._launch_traffic([(a, 4, True), (a, 4, False)]) == 16        # write, hit
    assert traffic._launch_traffic([(a, 2, False), (a + 4, 4, True)]) == 8 + 16


def test_the_readme_quotes_the_table(rows):
    """README.md's traffic table is the one `python -m rlhf_fast.benchmarks.traffic`
    prints (`traffic.markdown`, on the rows the budgets above check): regenerate it
    there when a figure moves."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert traffic.markdown(list(rows.values())) in readme.read_text(encoding="utf-8")
