"""benchmarks.extract's like-for-like ratios and their RESULTS.md tables, on made-up timings (no model run)."""

from __future__ import annotations

import pytest

from benchmarks.extract import ratios
from benchmarks.results_md import summarise_extract


def run(cold: float, warm: float) -> dict:
    return {"cold_s": 32 / cold, "warm_s": [32 / warm], "cold_images_per_s": cold, "warm_images_per_s": warm}


PIPELINE = {
    "plain_keras_loop": run(cold=4.0, warm=10.0),
    "tf_data_loop": run(cold=3.0, warm=12.0),  # the faster plain loop when warm, the slower when cold
    "tlfusion_keras": run(cold=2.0, warm=9.0),
    "tlfusion_auto": run(cold=1.0, warm=18.0),
    "tlfusion_cached_s": 0.4,
}
ENGINE = {
    "keras_predict_on_batch_images_per_s": 20.0,
    "keras_predict_images_per_s": 8.0,
    "onnx_images_per_s": 30.0,
    "onnx_over_keras_predict_on_batch": 1.5,
    "onnx_conversion_s": 12.0,
    "onnx_session_start_s": 0.3,
}


def test_ratios_compare_like_with_like():
    out = ratios(PIPELINE, ENGINE)
    assert out["engine_onnx_over_keras_predict_on_batch"] == 1.5
    assert out["pipeline_tlfusion_keras_over_plain_keras_loop_cold"] == pytest.approx(0.5)
    assert out["pipeline_tlfusion_keras_over_plain_keras_loop_warm"] == pytest.approx(0.9)
    assert out["tlfusion_auto_over_best_plain_cold"] == pytest.approx(0.25)  # against the cv2 loop (4.0)
    assert out["tlfusion_auto_over_best_plain_warm"] == pytest.approx(1.5)  # against tf.data (12.0)


def test_results_md_tables():
    payload = {"backbones": {"b0": {"engine": ENGINE, "pipeline": PIPELINE, "ratios": ratios(PIPELINE, ENGINE)}}}
    (_, _, engine), (_, _, pipeline), (_, _, ratio_rows) = summarise_extract(payload)
    assert engine == [["b0", 20.0, 8.0, 30.0, 12.0, 0.3]]
    assert pipeline[-1] == ["b0", "tlfusion, all features cached", 0.4, None, None]
    assert ["b0", "tlfusion_auto", 32.0, 1.0, 18.0] in pipeline
    assert len(ratio_rows) == 5
