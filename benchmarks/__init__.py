"""Measurements of the example: run each from the repository root as a module,
e.g. `python3 -m benchmarks.recipes --small`. See benchmarks/README.md."""
from plumbing.metrics import cpu_model  # noqa: F401  (the benchmarks name the CPU they ran on)
