"""Benchmarks and reproductions of sam_optax, run from a checkout of the repository.

Not installed with the package (``pip install`` ships ``sam_optax`` only):
run them from the repository root, e.g. ``python -m benchmarks.reproduce``.
The shared pieces are in :mod:`benchmarks.harness`.
"""
