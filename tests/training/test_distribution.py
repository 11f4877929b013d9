"""tf.distribute strategies (tlfusion.training.distribution): the choice, the scaling rule, and on two logical CPU
devices the same loss curve as one device at the same global batch and learning rate."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import write_png, xray_like
from tlfusion.errors import InputError
from tlfusion.training.distribution import distribution

TWO_DEVICES = """
import json

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)  # before TF starts
import keras
from tlfusion.training.distribution import distribution

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


FINETUNE_ON_TWO_DEVICES = """
import json
import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import pandas as pd
from tlfusion.training.finetune import finetune
from tlfusion.training.task import TrainSettings

table, out = pd.read_csv(sys.argv[1]), sys.argv[2]


def tune(name, distribute, batch_size, learning_rate, epochs, resume=False):
    settings = dict(image_size=32, warmup_epochs=0, patience=5, augment=False, batchnorm="freeze", seed=0)
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, unfrozen_learning_rate=learning_rate,
                             distribute=distribute, options={"alpha": 0.35}, **settings)
    result = finetune(table, "mobilenetv2", f"{out}/{name}", settings, positive_class="abnormal", verbose=0,
                      resume=resume)
    return [{key: row[key] for key in ("loss", "val_loss")} for row in result.history]


tuned = {"one": tune("one", "default", 8, 2e-3, 3), "two": tune("two", "mirrored", 4, 1e-3, 3)}
tune("resumed", "mirrored", 4, 1e-3, 2)
tuned["resumed"] = tune("resumed", "mirrored", 4, 1e-3, 3, resume=True)
print(json.dumps(tuned))
"""


def run_fresh(script: str, *args: str) -> dict:
    """The JSON `script` prints last, run in a fresh interpreter (logical devices must be configured before
    TensorFlow initialises)."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def curves() -> dict:
    return run_fresh(TWO_DEVICES)


@pytest.mark.slow
def test_finetune_on_two_devices_follows_one_device_and_resumes_under_the_strategy(tmp_path):
    """tlfusion.training.finetune.finetune, 3 epochs: mirrored at 4 per replica and lr 1e-3 (scaled: 8 and 2e-3)
    against one device at 8 and 2e-3, and the mirrored run stopped after epoch 2 and resumed from its checkpoint (~11
    min at load 9 on 2 cores: MirroredStrategy over logical CPU devices is slow)."""
    rows = [
        {"path": str(write_png(tmp_path / f"{label}{i}.png", xray_like(i, 40, blob))), "label": label, "split": split}
        for label, blob in (("normal", False), ("abnormal", True))
        for i, split in enumerate(["train"] * 8 + ["val"] * 4)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "table.csv", index=False)
    tuned = run_fresh(FINETUNE_ON_TWO_DEVICES, str(tmp_path / "table.csv"), str(tmp_path / "runs"))
    for name in ("two", "resumed"):
        for got, expected in zip(tuned[name], tuned["one"], strict=True):
            assert got == pytest.approx(expected, rel=2e-3, abs=1e-4), name


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
