"""The multi-label task: semantic metric learning, label embeddings and the multi-label evaluation."""
