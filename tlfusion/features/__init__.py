"""Features: the backbones' penultimate features extracted (runners, ONNX graphs, cache, cluster) and fused.

`FeatureFusion` is re-exported here because bundles saved before the package layout record its class as
`tlfusion.features.FeatureFusion` (skops loads it by that path; `bundle.estimator_files.TRUSTED_TYPES` trusts both).
"""

from tlfusion.features.fusion import FeatureFusion

__all__ = ["FeatureFusion"]
