"""Benchmarks of sidvid_rec: the suite (``python -m benchmarks.run``) and the standalone studies.

A package so that ``python -m benchmarks.<module>`` and the suite's subprocess workers import
each other's helpers (``from benchmarks.jagged_vs_padded import ...``) from the repo root.
"""
