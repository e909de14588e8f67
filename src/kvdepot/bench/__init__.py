"""Benchmarks, runnable as `kvdepot bench <name>`; each reports ratios to a limit it measures.

Benchmarks run in the caller's process and are never imported by the library itself.
"""
