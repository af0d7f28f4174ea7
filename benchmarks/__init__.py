"""Benchmark scripts (run from the repository root, e.g. `python benchmarks/bench_eager.py`)."""
