"""tf.distribute strategies (tlfusion.strategy): the choice, the scaling rule, and on two logical CPU devices the
same loss curve as one device at the same global batch and learning rate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tlfusion.errors import InputError
from tlfusion.strategy import distribution

TWO_DEVICES = """
import json
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)  # before TF starts
import keras
from tlfusion.strategy import distribution

rng = np.random.default_rng(0)
x = rng.normal(size=(96, 8)).astype("float32")
y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("float32")


def curve(setting, per_replica_batch, learning_rate):
    chosen = distribution(setting)
    keras.utils.set_random_seed(0)
    with chosen.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(chosen.learning_rate(learning_rate))
        model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(chosen.global_batch(per_replica_batch))
    history = model.fit(data, epochs=4, verbose=0).history["loss"]
    return {"replicas": chosen.replicas, "loss": history, **chosen.describe()}


one, two, auto = curve("default", 16, 0.01), curve("mirrored", 8, 0.005), curve("auto", 16, 0.01)
print(json.dumps({"one": one, "two": two, "auto": auto}))
"""


@pytest.fixture(scope="module")
def curves() -> dict:
    """One fresh interpreter (logical devices must be configured before TensorFlow initialises)."""
    done = subprocess.run([sys.executable, "-c", TWO_DEVICES], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_logical_devices_follow_the_one_device_loss_curve(curves):
    one, two = curves["one"], curves["two"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert two["strategy"] == "MirroredStrategy" and len(two["devices"]) == 2
    assert one["loss"][-1] < one["loss"][0] - 0.05  # it learns, so equal curves mean something
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-5)


def test_auto_without_gpus_or_tf_config_is_the_default_strategy(curves):
    assert (curves["auto"]["distribute"], curves["auto"]["replicas"]) == ("default", 1)


def test_scaling_rule_and_bad_settings(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    chosen = distribution("default")
    assert (chosen.global_batch(32), chosen.learning_rate(1e-3)) == (32, 1e-3)
    with pytest.raises(InputError, match="distribute must be one of auto, default, mirrored, multi_worker"):
        distribution("horovod")
    with pytest.raises(InputError, match="multi_worker needs TF_CONFIG"):
        distribution("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(InputError, match="TF_CONFIG: not a JSON object"):
        distribution("auto")
