"""Helpers for the tests and the benchmarks: local servers, in-process classification."""
