"""The saved fusion model: its folder, estimator files, signature, out-of-distribution check, cluster prediction."""
