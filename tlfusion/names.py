"""Registry names without their implementations, so validating an experiment imports no TensorFlow or scikit-learn.

Each tuple equals the keys of the registry it names (checked by tests/test_api.py).
"""

BACKBONES = (
    "densenet121",
    "resnet50",
    "inceptionv3",
    "xception",
    "efficientnetb0",
    "mobilenet",
    "mobilenetv2",
    "convnexttiny",
)
"""`tlfusion.backbones.REGISTRY`."""
CLASSIFIERS = ("lr", "svm", "rf", "knn", "xgb", "vote")
"""`tlfusion.classifiers.CLASSIFIERS`."""
FEWSHOT_CLASSIFIERS = ("prototype", "prototype_cosine", "knn", "simpleshot", "logistic")
"""`tlfusion.fewshot.FEWSHOT_CLASSIFIERS`."""
LOSSES = ("bce", "dual_weighted", "focused_euclidean")
"""`tlfusion.semantic.LOSSES` (multi-label semantic losses)."""
