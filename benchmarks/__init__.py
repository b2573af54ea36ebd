"""Benchmarks: each runs a variant and its baseline side by side in one run and reports ratios."""
