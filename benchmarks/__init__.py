"""Benchmarks (`make bench`): not tests; they print figures. See benchmarks/run.py."""
