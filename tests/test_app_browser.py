"""The app in a real browser: Debian's chromium driven by playwright (never `playwright install`).

Skipped only where /usr/bin/chromium is absent. Set DEQ_SCREENSHOT_DIR to keep the screenshot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1000})
        finally:
            browser.close()


def test_upload_streams_two_curves_and_a_label(page, app_url, tmp_path):
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator('#image-input input[type="file"]').set_input_files(str(EXAMPLES / "deer.jpg"))
    traces = page.locator('#residual-plot [data-testid="plotly"] .scatterlayer .trace')
    traces.nth(1).wait_for(state="attached", timeout=60_000)
    assert traces.count() == 2
    label = page.locator('#prediction [data-testid="label-output-value"]')
    label.wait_for(timeout=60_000)
    assert label.inner_text().strip()
    page.get_by_text("Same prediction").wait_for(timeout=60_000)  # the final frame arrived
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("DEQ_SCREENSHOT_DIR"):
        Path(os.environ["DEQ_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["DEQ_SCREENSHOT_DIR"]) / "app.png")
