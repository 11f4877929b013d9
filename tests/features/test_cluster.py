"""Extraction and prediction sharded over local two-worker Dask clusters started by the tests: the same features
and probabilities as one process, and a worker killed mid-shard has its shard re-run.

The default suite's cluster runs its two workers as threads of the test process (a worker process imports
TensorFlow, ~10 s of CPU each); the kill test needs worker processes and is marked slow.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import cloudpickle
import distributed
import numpy as np
import pandas as pd
import pytest

from tests.conftest import write_folder_dataset, write_png, xray_like
from tests.test_cli import tiny_experiment
from tlfusion.backbones.registry import build_backbone
from tlfusion.cli import main
from tlfusion.errors import InputError
from tlfusion.features import cluster as cluster_module
from tlfusion.features.extraction import extract_features

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module

SIZE = 32


class KillOnce(distributed.WorkerPlugin):
    """Makes the first worker that reaches a shard's second batch kill its own process (SIGKILL: no cleanup), once
    for the cluster's lifetime (a marker file records it)."""

    name = "kill-once"

    def __init__(self, marker: str):
        self.marker = marker

    def setup(self, worker) -> None:
        from tlfusion.features import runners as feature_runners

        self.original = original = feature_runners.decoded_batches
        marker = Path(self.marker)

        def dying(*args, **kwargs):
            for index, batch in enumerate(original(*args, **kwargs)):
                if index == 1 and not marker.exists():
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
                yield batch

        feature_runners.decoded_batches = dying

    def teardown(self, worker) -> None:
        from tlfusion.features import runners as feature_runners

        feature_runners.decoded_batches = self.original


def local_cluster(processes: bool):
    return distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=None, silence_logs=logging.ERROR
    )


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(processes=False) as threads:
        yield threads


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    return [str(write_png(folder / f"{i}.png", xray_like(i, 40 + i))) for i in range(12)]


@pytest.fixture(scope="module")
def model():
    return build_backbone("mobilenetv2", SIZE, alpha=0.35)


def leftovers(cache: Path) -> list[Path]:
    """Staging folders and temporary files left in a cache folder."""
    return [path for path in cache.rglob(".*") if ".partial" in path.name or ".tmp" in path.name]


def on_cluster(address: str, model, images: list[str], cache: Path, batch_size: int, flip: bool = False) -> np.ndarray:
    return extract_features(
        model, images, SIZE, cache_dir=cache, engine="keras", batch_size=batch_size, scheduler=address, flip=flip
    )


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
def test_features_match_one_process_and_land_in_the_same_cache_layout(cluster, images, model, tmp_path, flip):
    cache = tmp_path / "local"
    local = extract_features(model, images, SIZE, cache_dir=cache, engine="keras", batch_size=4, flip=flip)
    sharded = on_cluster(cluster.scheduler_address, model, images, tmp_path / "dask", batch_size=4, flip=flip)
    np.testing.assert_allclose(sharded, local, atol=1e-5, rtol=0)
    for cache in ("local", "dask"):
        chunks = sorted(path.name.split(".")[1] for path in (tmp_path / cache).rglob("chunk-*"))
        assert chunks == ["npy", "txt"], cache  # one chunk: shards are merged into what a local run writes
    assert not leftovers(tmp_path / "dask")
    again = extract_features(model, images, SIZE, cache_dir=tmp_path / "dask", scheduler="tcp://127.0.0.1:9", flip=flip)
    np.testing.assert_array_equal(again, sharded)  # all cached: the scheduler is not even contacted


@pytest.mark.slow
def test_a_worker_killed_mid_shard_has_its_shard_re_run(images, model, tmp_path):
    marker = tmp_path / "killed"
    with local_cluster(processes=True) as cluster, distributed.Client(cluster.scheduler_address) as client:
        client.register_plugin(KillOnce(str(marker)))
        try:
            sharded = on_cluster(cluster.scheduler_address, model, images, tmp_path / "dask", batch_size=2)
        finally:
            client.unregister_worker_plugin(KillOnce.name)
        client.wait_for_workers(2, timeout=60)
    assert marker.exists()  # a worker did die mid-shard
    local = extract_features(model, images, SIZE, engine="keras", progress=False)
    np.testing.assert_allclose(sharded, local, atol=1e-5, rtol=0)
    assert not leftovers(tmp_path / "dask")


def test_unreachable_scheduler_is_bad_input(images, model, tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_module, "CONNECT_TIMEOUT_S", 2)
    with pytest.raises(InputError, match="tcp://127.0.0.1:9: cannot connect"):
        extract_features(model, images[:2], SIZE, cache_dir=tmp_path, scheduler="tcp://127.0.0.1:9")
    with pytest.raises(InputError, match="needs cache_dir"):
        extract_features(model, images[:2], SIZE, scheduler="tcp://127.0.0.1:9")


def test_run_and_predict_on_the_cluster_give_the_same_features_metrics_and_probabilities(cluster, tmp_path):
    # ImageNet weights (shipped): features that vary between images (a random-init backbone's are near constant at
    # 32 px, and the classifiers then fit rounding noise)
    changes = {
        "backbones": [{"name": "mobilenetv2", "weights": "imagenet"}],
        "finetune": {"enabled": False},
        "classifiers": {"models": ["lr"], "cv": 2},
        "explain": {"enabled": False},
    }
    experiment = tiny_experiment(tmp_path, write_folder_dataset(tmp_path / "data"), **changes)
    scheduler = ["--scheduler", cluster.scheduler_address]
    assert main(["run", str(experiment), "--out", str(tmp_path / "local")]) == 0
    assert main(["run", str(experiment), "--out", str(tmp_path / "dask"), *scheduler]) == 0
    files = sorted((tmp_path / "local" / "features").glob("*.npy"))
    assert len(files) == 1
    for local in files:
        sharded = np.load(tmp_path / "dask" / "features" / local.name)
        np.testing.assert_allclose(sharded, np.load(local), atol=1e-5, rtol=0)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("local", "dask")]
    assert metrics[1] == metrics[0]
    predict = ["predict", str(tmp_path / "local" / "bundle"), str(tmp_path / "data"), "--out"]
    assert main([*predict, str(tmp_path / "local.csv")]) == 0
    assert main([*predict, str(tmp_path / "dask.csv"), *scheduler]) == 0
    local, sharded = (pd.read_csv(tmp_path / name) for name in ("local.csv", "dask.csv"))
    assert len(local) == 24 and list(sharded["path"]) == list(local["path"])
    np.testing.assert_allclose(sharded.iloc[:, 1], local.iloc[:, 1], atol=1e-6, rtol=0)
