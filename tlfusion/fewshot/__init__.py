"""Few-shot evaluation on cached features: episodes, distance classifiers and patient-level intervals."""
