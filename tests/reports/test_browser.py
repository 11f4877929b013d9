"""The run report and the review gallery as a reader sees them: rendered by headless Chromium at 1280 x 900 px.

Slow, and skipped where /usr/bin/chromium is missing (Debian/Ubuntu: `apt-get install -y chromium`). Run with
`python -m pytest tests/reports/test_browser.py -m slow`; the screenshots are left in pytest's tmp folder
(`--basetemp=DIR` to keep them somewhere known) for a look.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import write_png, xray_like
from tests.explain.test_explain_decision import data, fitted_bundle, tiny_backbone  # noqa: F401 (fixture)
from tests.reports.test_reports import binary_metrics_json, make_predictions
from tlfusion.explain.cases import explain_cases
from tlfusion.models.classifiers import build_xgb
from tlfusion.reports.report import write_reports

CHROMIUM = Path("/usr/bin/chromium")
WIDTH, HEIGHT = 1280, 900

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium (apt-get install -y chromium)"),
]

PROBE = """<script>
window.addEventListener("load", function () {
  var root = document.documentElement;
  var wide = Array.from(document.querySelectorAll("body *")).filter(function (element) {
    return element.getBoundingClientRect().right > root.clientWidth + 1;
  }).map(function (element) { return element.tagName + "." + element.className; });
  var scrolled = Array.from(document.querySelectorAll(".scroll")).filter(function (element) {
    return element.scrollWidth > element.clientWidth + 1;
  }).length;
  var images = Array.from(document.images);
  var unlabelled = images.filter(function (image) { return !image.alt; }).length;
  var drawn = images.filter(function (image) { return image.complete && image.naturalWidth > 0; }).length;
  var probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({page: root.scrollWidth, window: root.clientWidth, wide: wide,
    scrolled: scrolled, images: images.length, drawn: drawn, unlabelled: unlabelled});
  document.body.appendChild(probe);
});
</script></body>"""


def chromium(page: Path, profile: Path, *action: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ]
    command = [str(CHROMIUM), *flags, *action, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def layout(page: Path, tmp_path: Path) -> dict:
    """What the probe measured on `page` (a copy of it with the probe script is rendered)."""
    probed = page.with_name(f"probe_{page.name}")
    probed.write_text(page.read_text().replace("</body>", PROBE))
    dom = chromium(probed, tmp_path / "profile", "--dump-dom").stdout
    probed.unlink()
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, flags=re.S)
    assert found, dom[-500:]
    return json.loads(html.unescape(found[1]))


def screenshot(page: Path, tmp_path: Path) -> np.ndarray:
    png = tmp_path / f"{page.parent.name}_{page.stem}.png"
    chromium(page, tmp_path / "profile", f"--screenshot={png}")
    picture = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    assert picture is not None, f"{png}: no screenshot"
    return picture


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data) -> Path:  # noqa: F811 (the fixture imported above)
    """A run folder with a report (synthetic metrics: three feature sets x three classifiers) that links a gallery
    of three backbones' maps, the selected model's surrogate map and LIME on radiograph-shaped (tall) images."""
    run = tmp_path_factory.mktemp("browser_run")
    backbones = {
        "densenet121": tiny_backbone("densenet121", 5, 2, 1),
        "resnet50": tiny_backbone("resnet50", 4, 3, 2),
        "efficientnetb0": tiny_backbone("efficientnetb0", 3, 2, 3),
    }
    bundle = fitted_bundle(backbones, data, build_xgb())
    bundle.meta["model"] = "fusion/xgb"
    paths = [
        str(write_png(run / "images" / f"case{i}.png", cv2.resize(xray_like(i, 64), (240, 320)))) for i in range(4)
    ]
    explain_cases(
        bundle, paths, [0, 1, 0, 1], run / "explanations", lime_samples=30, reference=bundle.features(data[0])
    )
    predictions = make_predictions()
    write_reports(run, binary_metrics_json(predictions), predictions, {"fit": 1.5, "explain": 20.0})
    return run


@pytest.mark.parametrize("page", ["report.html", "explanations/index.html"])
def test_page_fits_1280_px_and_draws_every_labelled_image(run_dir, page, tmp_path):
    measured = layout(run_dir / page, tmp_path)
    assert measured["window"] == WIDTH
    assert measured["page"] <= WIDTH and not measured["wide"], measured  # no horizontal scrolling of the page
    assert measured["scrolled"] == 0, measured  # and no table that must be scrolled sideways
    assert measured["images"] > 0 and measured["drawn"] == measured["images"], measured
    assert measured["unlabelled"] == 0, measured
    picture = screenshot(run_dir / page, tmp_path)
    assert picture.shape == (HEIGHT, WIDTH) and picture.std() > 10


def test_report_links_the_gallery(run_dir):
    assert 'href="explanations/index.html"' in (run_dir / "report.html").read_text()
