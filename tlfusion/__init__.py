"""tlfusion: feature-fusion transfer learning for X-ray classification from small labelled sets."""

__version__ = "0.1.0"
