"""Screenshots of the real app (the shipped checkpoints) in headless chromium, for the README.

    python scripts/screenshot.py --out docs                  # docs/app-desktop.png, docs/app-phone.png
    python scripts/screenshot.py --out /tmp/shots --dark     # the dark theme too

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (never `playwright
install`). Serves app.py's page on 127.0.0.1 (a free port), picks an example image, waits for the
race's final frame and saves the screen at 1280x900 (desktop) and 390x844 (phone, where the page
has scrolled to the chart).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
VIEWPORTS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}


def shoot(url: str, out: Path, example: str, dark: bool) -> list[Path]:
    from playwright.sync_api import sync_playwright

    saved = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for name, viewport in VIEWPORTS.items():
                page = browser.new_page(viewport=viewport, device_scale_factor=1)
                page.goto(
                    url + ("?__theme=dark" if dark else "?__theme=light"), wait_until="domcontentloaded"
                )
                page.locator('#image-input input[type="file"]').set_input_files(
                    str(ROOT / "examples" / example)
                )
                page.get_by_text("Same prediction").wait_for(timeout=60_000)  # the final frame
                path = out / f"app-{name}{'-dark' if dark else ''}.png"
                page.screenshot(path=str(path))  # what the screen shows: on a phone, scrolled to the chart
                saved.append(path)
                page.close()
        finally:
            browser.close()
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--example", default="ship.jpg", help="one of examples/")
    parser.add_argument("--dark", action="store_true", help="the dark theme instead of the light one")
    args = parser.parse_args()
    import app

    args.out.mkdir(parents=True, exist_ok=True)
    demo = app.build_demo(app.environment_catalogue())
    _, url, _ = demo.launch(
        server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **app.LAUNCH_KWARGS
    )
    try:
        for path in shoot(url, args.out, args.example, args.dark):
            print(path)
    finally:
        demo.close()


if __name__ == "__main__":
    main()
