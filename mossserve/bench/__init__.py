"""Benchmarks behind `mossserve bench`."""
