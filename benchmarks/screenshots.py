"""Regenerate the README screenshots (docs/*.png) from the running app with headless Chromium.

    uv run python -m benchmarks.screenshots
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.harness import ROOT, StreamlitServer, chromium, read_decision, upload_files, wait_app_ready, wait_idle

DATA = Path(os.environ.get("CXR_DATA_DIR", ROOT.parent / "shared" / "data" / "chest_xray"))


def main() -> None:
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    image = sorted((DATA / "val" / "PNEUMONIA").iterdir())[0]
    with StreamlitServer() as server, chromium() as browser:
        page = browser.new_page(viewport={"width": 1500, "height": 1050}, device_scale_factor=1)
        page.goto(server.url)
        wait_app_ready(page)
        upload_files(page, [str(image)])
        read_decision(page)
        page.get_by_text("where the model looked").first.wait_for()
        wait_idle(page)
        page.wait_for_timeout(1500)  # let plotly finish drawing
        page.screenshot(path=str(docs / "diagnose.png"), full_page=False)
        page.get_by_role("link", name="Model report").click()
        page.get_by_text("Reliability diagram").first.wait_for(timeout=60_000)
        wait_idle(page)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(docs / "report.png"), full_page=True)
    print("wrote", docs / "diagnose.png", docs / "report.png")


if __name__ == "__main__":
    main()
