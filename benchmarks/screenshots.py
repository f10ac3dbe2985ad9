"""Regenerate the README screenshots (docs/*.png) from the running app with headless Chromium.

    uv run python -m benchmarks.screenshots [--pages diagnose report]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks.harness import ROOT, StreamlitServer, chromium, read_decision, upload_files, wait_app_ready, wait_idle

DATA = Path(os.environ.get("CXR_DATA_DIR", ROOT.parent / "shared" / "data" / "chest_xray"))
VIEWER_DRAWN = """() => [...document.querySelectorAll('.js-plotly-plot')].some((p) =>
    !p.closest('[data-stale="true"]') && p.querySelectorAll('.imagelayer image').length >= 2 && p.querySelector('.hm image'))"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", nargs="+", default=["diagnose", "report"], choices=["diagnose", "report"])
    args = ap.parse_args()
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    image = sorted((DATA / "val" / "PNEUMONIA").iterdir())[0]
    written = []
    with StreamlitServer() as server, chromium() as browser:
        page = browser.new_page(viewport={"width": 1500, "height": 1050}, device_scale_factor=1)
        page.goto(server.url)
        wait_app_ready(page, 300_000)
        if "diagnose" in args.pages:
            upload_files(page, [str(image)])
            read_decision(page, 300_000)
            page.wait_for_function(VIEWER_DRAWN, timeout=120_000)
            wait_idle(page)
            page.wait_for_timeout(1000)  # let the JPEGs decode
            page.screenshot(path=str(docs / "diagnose.png"), full_page=False)
            written.append(docs / "diagnose.png")
        if "report" in args.pages:
            page.get_by_role("link", name="Model report").click()
            page.get_by_text("Reliability diagram").first.wait_for(timeout=120_000)
            wait_idle(page)
            page.wait_for_timeout(2000)
            page.screenshot(path=str(docs / "report.png"), full_page=True)
            written.append(docs / "report.png")
    print("wrote", *written)


if __name__ == "__main__":
    main()
