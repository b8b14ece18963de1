"""Benchmarks (not tests): each script prints ratios measured in one run.

A regular package, so that `benchmarks.*` is ours even where another distribution (opacus)
installs a top-level `benchmarks` package into site-packages.
"""
