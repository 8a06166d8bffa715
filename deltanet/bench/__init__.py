"""Benchmarks behind ``deltanet bench``: kernels (``kernels.py``), models, decoding."""
