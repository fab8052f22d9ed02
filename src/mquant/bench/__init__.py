"""Benchmarks that `mquant bench` runs."""
