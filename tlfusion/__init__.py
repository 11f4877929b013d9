"""tlfusion: feature-fusion transfer learning for X-ray classification from small labelled sets.

Public API (TensorFlow is imported on first use, not by ``import tlfusion``, which changes no process state: the
``tlfusion`` command sets its environment defaults and logging itself, see ``tlfusion.console``):

- ``load_bundle(path)``: a saved model with ``predict_proba`` / ``predict`` on file paths or grayscale arrays;
- ``run_experiment(path, out=None, overrides=(), data_root=None, force=False)``: ``tlfusion run`` from Python;
- ``FeatureFusion``: the per-backbone normalisation + PCA step as a scikit-learn transformer.
"""

import importlib

__version__ = "0.1.0"
_LAZY = {
    "load_bundle": "tlfusion.api",
    "run_experiment": "tlfusion.api",
    "BundleModel": "tlfusion.api",
    "FeatureFusion": "tlfusion.features.fusion",
    "InputError": "tlfusion.errors",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """PEP 562: import the module behind a public name on first access."""
    if name not in _LAZY:
        raise AttributeError(f"module 'tlfusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
