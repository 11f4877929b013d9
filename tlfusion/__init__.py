"""tlfusion: feature-fusion transfer learning for X-ray classification from small labelled sets."""

import os

# XGBoost's and OpenMP's default busy-waiting makes small fits many times slower on a shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
