"""The classifiers over fused features and the names of the models they make."""
