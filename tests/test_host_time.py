"""Host time per call of the ops, in bare-aten-op equivalents
(`rlhf_fast.benchmarks.host_time`): within each op's budget, and options checked once."""

import pytest

from rlhf_fast import options
from rlhf_fast.benchmarks import host_time


@pytest.fixture(scope="module")
def rows():
    return {row["case"]: row for row in host_time.table()}


@pytest.mark.parametrize("name", list(host_time.CASES))
def test_host_time_within_budget(rows, name):
    assert rows[name]["bare_ops"] <= rows[name]["budget"], rows[name]


def test_repeated_options_are_checked_once(monkeypatch):
    calls = []
    check = options.OptionSet._check
    monkeypatch.setattr(options.OptionSet, "_check",
                        lambda self, given, owner: calls.append(1) or check(self, given, owner))
    given = dict(clip_eps=0.1234, kl_coef=0.5)
    first = options.PPO_OPTIONS.check(given)
    first.clip_eps = 9.0  # the caller's copy: the cached result is unchanged
    second = options.PPO_OPTIONS.check(given)
    assert len(calls) == 1 and second.clip_eps == 0.1234


def test_the_cache_tells_a_bool_from_an_int():
    """True == 1 in Python, and 1 is a valid float setting: True is not."""
    assert options.PPO_OPTIONS.check(dict(kl_coef=1)).kl_coef == 1.0
    with pytest.raises(TypeError, match="kl_coef must be a float"):
        options.PPO_OPTIONS.check(dict(kl_coef=True))


def test_unhashable_options_are_still_checked():
    with pytest.raises(TypeError, match="clip_eps"):
        options.PPO_OPTIONS.check(dict(clip_eps=[0.2]))
