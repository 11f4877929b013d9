"""Writes the committed bundle in this folder (run once, with the code before the package layout moved).

    python tests/data/bundle_before_layout/make_bundle.py

A tiny flat backbone with tlfusion's landmarks (input `image`, `xray_input`, `features`, `head`, named like a
registry model so `load_model_file` takes it), fusion fitted with PCA, a soft vote of logistic regression and
XGBoost (so the XGBoost files are covered), the out-of-distribution calibration and a sigmoid recalibration, on 16
synthetic 32 px radiographs. Four other images and their probabilities (inputs/, expected.csv) are what
tests/test_bundle_before_layout.py checks a later checkout against.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
from keras import layers
from sklearn.ensemble import VotingClassifier
from sklearn.linear_model import LogisticRegression
from xgboost import XGBClassifier

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from tests.conftest import xray_like  # noqa: E402
from tlfusion.backbones import XrayInput  # noqa: E402
from tlfusion.bundle import Bundle, save_bundle  # noqa: E402
from tlfusion.calibration import fit_calibrator  # noqa: E402
from tlfusion.classifiers import fusion_pipeline  # noqa: E402
from tlfusion.features import FeatureFusion  # noqa: E402
from tlfusion.ood import fit_feature_distance  # noqa: E402

SIZE = 32


def tiny_backbone() -> keras.Model:
    keras.utils.set_random_seed(0)
    image = keras.Input((SIZE, SIZE, 1), name="image")
    x = XrayInput("tf", name="xray_input")(image)
    x = layers.Conv2D(4, 3, strides=2, activation="relu", name="conv1")(x)
    x = layers.Conv2D(8, 3, strides=2, activation="relu", name="conv2")(x)
    features = layers.GlobalAveragePooling2D(name="features")(x)
    logits = layers.Dense(1, name="head")(layers.Dropout(0.2, name="head_dropout")(features))
    return keras.Model(image, logits, name="tlfusion_mobilenetv2")


def images(seeds: range, positive: bool) -> list[np.ndarray]:
    return [xray_like(seed, SIZE, bright_blob=positive) for seed in seeds]


def main() -> None:
    model = tiny_backbone()
    train = images(range(8), False) + images(range(100, 108), True)
    labels = np.repeat([0, 1], 8)
    batch = np.stack(train)[..., None].astype(np.float32)
    X = keras.Model(model.input, model.get_layer("features").output).predict(batch, verbose=0)
    fusion = FeatureFusion(block_sizes=[X.shape[1]], l2=True, pca=4).fit(X)
    Z = fusion.transform(X)
    members = [
        ("lr", LogisticRegression(C=1.0, max_iter=500)),
        ("xgb", XGBClassifier(n_estimators=4, max_depth=2, n_jobs=1, random_state=0)),
    ]
    classifier = VotingClassifier(members, voting="soft").fit(Z, labels)
    estimator = fusion_pipeline(fusion, classifier)
    bundle = Bundle(
        models={"tiny": model},
        estimator=estimator,
        threshold=0.5,
        class_names=["normal", "abnormal"],
        image_size=SIZE,
        meta={"data": "synthetic, tests/conftest.py xray_like"},
        ood=fit_feature_distance(X, np.arange(len(X))),
        calibration=fit_calibrator("sigmoid", labels, estimator.predict_proba(X)[:, 1]),
    )
    save_bundle(bundle, HERE / "bundle")
    inputs = HERE / "inputs"
    inputs.mkdir(exist_ok=True)
    names = []
    for i, pixels in enumerate(images(range(50, 52), False) + images(range(150, 152), True)):
        names.append(f"image{i}.png")
        cv2.imwrite(str(inputs / names[-1]), pixels)
    loaded = __import__("tlfusion.bundle", fromlist=["load_bundle"]).load_bundle(HERE / "bundle")
    prob, ood = loaded.assess_paths([inputs / name for name in names])
    frame = pd.DataFrame({"image": names, "p_normal": prob[:, 0], "p_abnormal": prob[:, 1], "ood": ood})
    frame.to_csv(HERE / "expected.csv", index=False, float_format="%.17g")


if __name__ == "__main__":
    main()
