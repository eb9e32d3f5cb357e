"""Benchmarks: `python -m benchmarks [--quick] [--only NAME ...] [--model random-sd15|tiny]`; results in
benchmarks/results/latest/ (see `__main__`)."""
