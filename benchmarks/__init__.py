"""Benchmarks: each a module run with `python -m benchmarks.<name>`, figures to a JSON file."""
