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
"""`tlfusion.backbones.registry.REGISTRY`."""
CLASSIFIERS = ("lr", "svm", "rf", "knn", "xgb", "vote")
"""`tlfusion.models.classifiers.CLASSIFIERS`."""
FEWSHOT_CLASSIFIERS = ("prototype", "prototype_cosine", "knn", "simpleshot", "logistic")
"""`tlfusion.fewshot.evaluation.FEWSHOT_CLASSIFIERS`."""
LOSSES = ("bce", "dual_weighted", "focused_euclidean")
"""`tlfusion.semantic.metric_learning.LOSSES` (multi-label semantic losses)."""
CLASS_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "kappa", "quadratic_kappa", "macro_auroc")
"""`tlfusion.evaluation.class_metrics.CLASS_METRICS`: the headline metrics of a K-class result row."""
