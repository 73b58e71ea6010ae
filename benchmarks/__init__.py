"""Benchmark scripts, each run as `python benchmarks/NAME.py` (see benchmarks/README.md).

A script imports vistune, the tiny parts of `vistune.testing`, and a sibling script by its plain name
(`from train_tiny import environment`: Python puts a script's folder first on sys.path). The tests
import the functions they check as `benchmarks.NAME`, with the repository root on pytest's pythonpath.
"""
