"""Backbones: the architecture registry, ImageNet weights without a network, and TFLite weight reading.

`load_model_file` is re-exported here because the shipped `saved_models/*/MODEL_CARD.md` files, written before the
package layout, name it `tlfusion.backbones.load_model_file`.
"""

from tlfusion.backbones.registry import load_model_file

__all__ = ["load_model_file"]
