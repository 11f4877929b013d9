"""Scoring: binary and K-class metrics, result rows, the metrics.json schema, calibration and subgroups."""
