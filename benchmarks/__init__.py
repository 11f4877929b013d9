"""Reproducible speed/accuracy benchmarks: `python -m benchmarks.NAME`, results as JSON in benchmarks/results/."""
