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


#: The number of line boxes of each table cell under an element: a word broken across lines gives 2+.
CELL_LINES_JS = """(root) => Array.from(document.querySelectorAll(root + ' th, ' + root + ' td'))
    .filter(cell => cell.textContent.trim())
    .map(cell => {
        const range = document.createRange();
        range.selectNodeContents(cell);
        return new Set(Array.from(range.getClientRects()).map(r => Math.round(r.top))).size;
    })"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def solve_example(page, app_url, name: str) -> None:
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator('#image-input input[type="file"]').set_input_files(str(EXAMPLES / name))
    page.get_by_text("Same prediction").wait_for(timeout=60_000)  # the final frame arrived


def test_upload_streams_two_curves_and_a_label(browser, app_url, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator('#image-input input[type="file"]').set_input_files(str(EXAMPLES / "deer.jpg"))
    traces = page.locator('#residual-plot [data-testid="plotly"] .scatterlayer .trace')
    traces.nth(1).wait_for(state="attached", timeout=60_000)
    assert traces.count() == 2
    label = page.locator('#prediction [data-testid="label-output-value"]')
    label.wait_for(timeout=60_000)
    assert label.inner_text().strip()
    page.get_by_text("Same prediction").wait_for(timeout=60_000)  # the final frame arrived
    title = page.locator("#residual-plot .gtitle").text_content()
    assert title.startswith("Anderson:") and "forward iteration:" in title  # the verdict, above the fold
    assert page.locator("#answer-plot .scatterlayer .trace").count() == 2
    lines = page.evaluate(CELL_LINES_JS, "#results-table")
    assert lines and all(n == 1 for n in lines)
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("DEQ_SCREENSHOT_DIR"):
        Path(os.environ["DEQ_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["DEQ_SCREENSHOT_DIR"]) / "app.png")
    page.close()


def test_on_a_phone_the_chart_comes_into_view_and_no_table_cell_breaks_a_word(browser, app_url):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    solve_example(page, app_url, "ship.jpg")
    top = page.evaluate("document.getElementById('residual-plot').getBoundingClientRect().top")
    assert 0 <= top < 844 / 2  # scrolled to the chart when the solve started
    lines = page.evaluate(CELL_LINES_JS, "#results-table")
    assert len(lines) >= 16 and all(n == 1 for n in lines)  # header and two rows, one line each
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # only the table scrolls sideways
    page.get_by_role("tab", name="The model").click()
    page.locator("#model-card table").first.wait_for(timeout=30_000)
    lines = page.evaluate(CELL_LINES_JS, "#model-card")
    assert lines and all(n == 1 for n in lines)  # the card's tables too
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.close()


def test_the_plots_follow_the_dark_theme(browser, app_url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    solve_example(page, app_url.rstrip("/") + "/?__theme=dark", "cat.jpg")
    background = page.evaluate(
        "getComputedStyle(document.querySelector('#residual-plot .main-svg')).backgroundColor"
    )
    assert background in ("rgba(0, 0, 0, 0)", "transparent")  # no white box on a dark page
    page.close()
