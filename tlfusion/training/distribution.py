"""Training on several devices or hosts with TensorFlow's `tf.distribute` (`pretrain` and `finetune`).

`distribute` (a pretraining YAML key, `finetune.distribute` in an experiment) picks the strategy:

- `default`: one device (TensorFlow's default strategy);
- `mirrored`: every GPU of this host (MirroredStrategy: a model copy per GPU, gradients all-reduced each step);
  on a host without GPUs, every logical CPU device (one unless configured: how the tests run it);
- `multi_worker`: several hosts, each running the same command with `TF_CONFIG` naming the cluster and its own
  task (MultiWorkerMirroredStrategy);
- `auto` (default): `multi_worker` when `TF_CONFIG` names more than one task, `mirrored` when more than one GPU is
  visible, otherwise `default`.

Scaling rule: the configured `batch_size` is per replica (device). A step takes `batch_size` x replicas images
(the global batch) and every learning rate is multiplied by the number of replicas (the linear scaling rule of
Goyal et al. 2017, "Accurate, Large Minibatch SGD"), so an epoch moves the weights about as far as on one device in
fewer steps. One replica changes nothing; a run on N replicas equals a one-device run at batch `batch_size` x N and
learning rate x N.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cache
from typing import Any

from tlfusion.errors import InputError

logger = logging.getLogger(__name__)

DISTRIBUTE = ("auto", "default", "mirrored", "multi_worker")


@dataclass(frozen=True)
class Distribution:
    """A `tf.distribute` strategy, the setting that chose it, and the scaling rule for its replicas."""

    name: str
    strategy: Any

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def global_batch(self, per_replica: int) -> int:
        """Images per step over all replicas."""
        return per_replica * self.replicas

    def learning_rate(self, rate: float) -> float:
        """The configured rate scaled linearly with the replicas."""
        return rate * self.replicas

    def scope(self) -> AbstractContextManager:
        """Build and compile models inside this (their variables are mirrored on every replica)."""
        return self.strategy.scope()

    def describe(self) -> dict[str, Any]:
        """What a run records: strategy, replicas and the devices of this worker."""
        try:
            devices = list(self.strategy.extended.worker_devices)
        except RuntimeError:  # the default strategy has no device list
            devices = []
        strategy = type(self.strategy).__name__
        return {"distribute": self.name, "strategy": strategy, "replicas": self.replicas, "devices": devices}


def distribution(setting: str = "auto") -> Distribution:
    """The strategy for `setting` (one of `DISTRIBUTE`); "multi_worker" without a usable TF_CONFIG is bad input."""
    if setting not in DISTRIBUTE:
        raise InputError(f"distribute must be one of {', '.join(DISTRIBUTE)}; got {setting!r}")
    import tensorflow as tf

    name = _auto(tf) if setting == "auto" else setting
    if name == "multi_worker" and _cluster_tasks() < 1:
        raise InputError("distribute: multi_worker needs TF_CONFIG naming the cluster and this worker's task")
    strategy = _strategy(name)
    chosen = Distribution(name, strategy)
    log = logger.debug if name == "default" else logger.info  # the plain one-device case is not news
    log("distribute: %s (%s), %d replica(s)", name, type(strategy).__name__, chosen.replicas)
    return chosen


@cache
def _strategy(name: str) -> Any:
    """One strategy object per kind and process: strategies made anew for every run on the same devices share
    collective-op keys, and a second run's all-reduce then fails with shape mismatches."""
    import tensorflow as tf

    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    return tf.distribute.get_strategy()


def _auto(tf: Any) -> str:
    if _cluster_tasks() > 1:
        return "multi_worker"
    return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"


def _cluster_tasks() -> int:
    """Tasks in TF_CONFIG's cluster (0 when unset); malformed TF_CONFIG is bad input."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return 0
    try:
        config = json.loads(raw)
        return sum(len(addresses) for addresses in config["cluster"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"TF_CONFIG: not a JSON object with a 'cluster' of task lists ({error})") from None
