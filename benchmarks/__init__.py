"""Benchmark suites, one per op. Installed as `rlhf_fast.benchmarks` (see setup.py)."""
