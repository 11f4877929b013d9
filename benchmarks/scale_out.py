"""Scale-out: feature extraction on 1 vs 2 local Dask workers over the same images, and a projection of large
extractions and pretraining from measured per-image costs.

    python -m benchmarks.scale_out [--quick]

MobileNetV2 (random weights, 224 px, ONNX Runtime as `engine: auto` picks) over PNGs from ../shared/data. The ONNX
graph is converted once, untimed, and copied into every fresh cache folder. Timed, each into a fresh cache folder:
`extract_features` in this process (no scheduler), then with a scheduler on a LocalCluster of 1 and of 2 worker
processes (one thread each; tlfusion imported on every worker untimed, each worker's graph load timed). The two
workers of this 2-core machine share the cores the one worker already used (ONNX Runtime runs each session on
every core), so the ratio measures what sharding costs or saves here, not what a second machine would add.

The projection (`projection` in the JSON) divides work by measured rates: extraction images/s per 2-core worker
(benchmarks/results/extract.json and scaling.json, 224 px) times the workers, scaled by this run's cluster
efficiency (1-worker images/s over local images/s, at most 1); pretraining from the shipped models' train.json
(train images x epochs run / wall seconds, validation and checkpoints included), assuming linear scaling over
replicas at a fixed per-replica batch (tlfusion.training.distribution). No GPU was measured here: GPU rows need a GPU's
rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks._common import RESULTS_DIR, machine_info, write_result

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "kermany_pneumonia"
IMAGE_SIZE = 224
BATCH_SIZE = 32
PACKAGES = ("dask", "distributed", "keras", "onnxruntime", "numpy")
EXTRACT_IMAGES = 100_000
PRETRAIN_IMAGES = 40_000  # MURA-v1.1 size
PRETRAIN_EPOCHS = 15  # the shipped pretraining schedule's maximum
WORKERS = (1, 2, 4, 8, 16)
SHIPPED = ("mobilenetv2_xray128", "efficientnetb0_xray128", "mobilenet_imagenet_xray224")


def pick_images(count: int) -> list[str]:
    paths = sorted(str(path) for path in DATA.rglob("*.png"))
    if len(paths) < count:
        raise SystemExit(f"{DATA}: {len(paths)} PNG files, {count} needed")
    return paths[:count]


def timed_extraction(model_file: Path, images: list[str], onnx_dir: Path, scheduler: str | None) -> float:
    """Seconds for one extraction into a fresh cache folder seeded with the converted graph."""
    from tlfusion.features.extraction import extract_features

    with tempfile.TemporaryDirectory() as cache:
        shutil.copytree(onnx_dir, Path(cache) / "onnx")
        started = time.perf_counter()
        extract_features(model_file, images, IMAGE_SIZE, batch_size=BATCH_SIZE, cache_dir=cache, scheduler=scheduler)
        return time.perf_counter() - started


def on_cluster(workers: int, model_file: Path, images: list[str], onnx_dir: Path) -> float:
    from distributed import Client, LocalCluster

    options = {"threads_per_worker": 1, "dashboard_address": None, "silence_logs": logging.ERROR}
    with LocalCluster(n_workers=workers, **options) as cluster, Client(cluster, set_as_default=False) as client:
        client.run(__import__, "tlfusion.features.cluster")  # TensorFlow and tlfusion loaded on every worker, untimed
        return timed_extraction(model_file, images, onnx_dir, cluster.scheduler_address)


def measure(count: int, folder: Path) -> dict:
    """Local, 1-worker and 2-worker seconds and images/s over the same `count` images."""
    from tlfusion.backbones.registry import build_backbone
    from tlfusion.features.onnx_graphs import cached_onnx_graph
    from tlfusion.features.source import ModelSource

    images = pick_images(count)
    model_file = folder / "mobilenetv2.keras"
    build_backbone("mobilenetv2", IMAGE_SIZE).save(model_file)
    cached_onnx_graph(ModelSource(model_file), folder)  # converted once, untimed
    onnx_dir = folder / "onnx"
    seconds = {"local": timed_extraction(model_file, images, onnx_dir, None)}
    for workers in (1, 2):
        seconds[f"workers_{workers}"] = on_cluster(workers, model_file, images, onnx_dir)
    runs = {
        name: {"seconds": round(value, 2), "images_per_s": round(count / value, 1)} for name, value in seconds.items()
    }
    return {
        "images": count,
        "runs": runs,
        "two_vs_one_worker_speedup": round(seconds["workers_1"] / seconds["workers_2"], 3),
        "cluster_efficiency": round(seconds["local"] / seconds["workers_1"], 3),
    }


def extraction_rates() -> dict[str, float]:
    """Measured images/s per backbone at 224 px on this 2-core machine (one process, ONNX Runtime)."""
    rates = {"mobilenetv2": json.loads((RESULTS_DIR / "scaling.json").read_text())["sizes"][-1]["images_per_s"]}
    extract = json.loads((RESULTS_DIR / "extract.json").read_text())["backbones"]
    rates.update({name: row["tlfusion_images_per_s"] for name, row in extract.items()})
    return rates


def pretraining_rates() -> dict[str, dict]:
    """Training images/s of each shipped pretraining run (train images x epochs run / wall seconds)."""
    rates = {}
    for name in SHIPPED:
        record = json.loads((REPO / "saved_models" / name / "train.json").read_text())
        train_images = sum(record["data"]["train"].values())
        rate = train_images * record["epochs_run"] / record["wall_seconds"]
        rates[name] = {"image_size": record["settings"]["image_size"], "images_per_s": round(rate, 1)}
    return rates


def projection(efficiency: float) -> dict:
    """Hours for `EXTRACT_IMAGES` extracted and `PRETRAIN_IMAGES` x `PRETRAIN_EPOCHS` trained on N workers."""
    extraction = [
        {"backbone": name, "images_per_s_per_worker": rate, "cluster_efficiency": efficiency}
        | {f"hours_{n}_workers": round(EXTRACT_IMAGES / (rate * efficiency * n) / 3600, 2) for n in WORKERS}
        for name, rate in extraction_rates().items()
    ]
    pretraining = [
        {"model": name, **rates}
        | {
            f"hours_{n}_replicas": round(PRETRAIN_IMAGES * PRETRAIN_EPOCHS / (rates["images_per_s"] * n) / 3600, 1)
            for n in WORKERS
        }
        for name, rates in pretraining_rates().items()
    ]
    return {f"extract_{EXTRACT_IMAGES}_images": extraction, f"pretrain_{PRETRAIN_IMAGES}_images": pretraining}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="96 images (well under a minute idle)")
    parser.add_argument("--images", type=int, help="images to extract (default 480, or 96 with --quick)")
    args = parser.parse_args(argv)
    count = args.images or (96 if args.quick else 480)
    payload = {"benchmark": "scale_out", "quick": args.quick, "machine": machine_info(*PACKAGES)}
    payload["settings"] = {
        "backbone": "mobilenetv2",
        "weights": None,
        "image_size": IMAGE_SIZE,
        "batch_size": BATCH_SIZE,
        "engine": "auto",
        "data": str(DATA),
    }
    with tempfile.TemporaryDirectory() as folder:
        payload["scale_out"] = measure(count, Path(folder))
    payload["projection"] = projection(min(1.0, payload["scale_out"]["cluster_efficiency"]))  # never above local
    payload["notes"] = [
        f"Projection: hours = {EXTRACT_IMAGES:,} images / (images/s per 2-core worker x cluster efficiency x N);",
        f"pretraining {PRETRAIN_IMAGES:,} images x {PRETRAIN_EPOCHS} epochs / (measured CPU images/s x N replicas),",
        "linear in N (a fixed per-replica batch; all-reduce and shared-storage reads assumed not to bind).",
        "No GPU was measured here: for N GPUs, put one GPU's images/s (train.json of a one-GPU run) in the formula.",
    ]
    path = write_result("scale_out_quick" if args.quick else "scale_out", payload)
    print(json.dumps(payload["scale_out"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
