"""Benchmarks (``make bench``): measurements to read, not tests to pass.

``python -m bench`` runs them all; ``python -m bench import --rows 10000000`` one of them.
Generated data, logs and JSON results live under ``.conveyor/bench/``.
"""
