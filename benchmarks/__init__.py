"""Benchmarks: `python -m benchmarks [--quick] [--only NAME ...]`; results in benchmarks/results/."""
