"""End to end in a real browser: `streamlit run` on a free localhost port + Debian's Chromium via Playwright.

Screenshots are written to test-artifacts/ (ignored by git).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.harness import (
    CHROMIUM, ROOT, StreamlitServer, chromium, read_decision, set_slider_extreme, slider, upload_files, wait_app_ready,
    wait_idle,
)
from tests.conftest import IN_CI, make_artifact_with_report

pytestmark = pytest.mark.browser
ARTIFACTS = ROOT / "test-artifacts"
THRESHOLD = "P(pneumonia) at or above"
BAND = "Uncertain band"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail(f"{CHROMIUM} missing in CI: .ci/run should have installed it")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    """The shipped model when present (what users get), else a random-weight model with a real report."""
    model_dir = ROOT / "assets" / "model"
    if not (model_dir / "model.json").is_file():
        model_dir = make_artifact_with_report(tmp_path_factory.mktemp("e2e_model"), data_dir)
    with StreamlitServer(model_dir) as s:
        yield s


@pytest.fixture
def page(browser, server):
    ARTIFACTS.mkdir(exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    p = ctx.new_page()
    p.goto(server.url)
    wait_app_ready(p)
    yield p
    ctx.close()


def test_diagnose_flow(page, real_images):
    path = real_images["NORMAL"][0]
    upload_files(page, [str(path)])
    decision = read_decision(page)
    assert decision in ("PNEUMONIA", "NORMAL", "UNCERTAIN")
    page.get_by_text("where the model looked", exact=False).first.wait_for()
    assert page.locator(".js-plotly-plot").count() >= 2  # gauge + X-ray/heatmap pair
    page.screenshot(path=str(ARTIFACTS / "e2e_diagnose.png"), full_page=True)

    wait_idle(page)
    opacity = slider(page, "Heatmap opacity")
    before = opacity.get_attribute("aria-valuetext")
    opacity.focus()
    opacity.press("ArrowRight")
    wait_idle(page)
    assert slider(page, "Heatmap opacity").get_attribute("aria-valuetext") != before

    # the decision follows the threshold: everything is pneumonia at 0, nothing at 1 (no uncertain band)
    set_slider_extreme(page, BAND, "Home")
    wait_idle(page)
    set_slider_extreme(page, THRESHOLD, "Home")
    wait_idle(page)
    assert read_decision(page) == "PNEUMONIA"
    set_slider_extreme(page, THRESHOLD, "End")
    wait_idle(page)
    assert read_decision(page) == "NORMAL"
    page.screenshot(path=str(ARTIFACTS / "e2e_threshold_flip.png"), full_page=True)


def test_corrupt_file_shows_error_and_good_file_still_works(page, real_images, tmp_path):
    good = real_images["PNEUMONIA"][0]
    corrupt = tmp_path / "corrupt.jpeg"
    corrupt.write_bytes(good.read_bytes()[:2000])
    upload_files(page, [str(good), str(corrupt)])
    page.get_by_text(re.compile(r"corrupt\.jpeg.*could not be analysed")).first.wait_for(timeout=60_000)
    assert read_decision(page) in ("PNEUMONIA", "NORMAL", "UNCERTAIN")
    assert page.get_by_text("Traceback").count() == 0
    page.screenshot(path=str(ARTIFACTS / "e2e_corrupt.png"), full_page=True)


def test_report_page_follows_threshold(page):
    page.get_by_role("link", name="Model report").click()
    page.get_by_text("ROC curve").first.wait_for(timeout=60_000)
    page.get_by_text("Reliability diagram").first.wait_for()
    summary = page.get_by_text(re.compile(r"^At threshold")).first
    set_slider_extreme(page, THRESHOLD, "Home")
    wait_idle(page)
    low = summary.inner_text()
    set_slider_extreme(page, THRESHOLD, "End")
    wait_idle(page)
    high = summary.inner_text()
    assert low.startswith("At threshold 0.00") and high.startswith("At threshold 1.00")
    assert re.search(r"(\d+) of \1 pneumonia films flagged", low)  # threshold 0 flags every pneumonia film
    page.screenshot(path=str(ARTIFACTS / "e2e_report.png"), full_page=True)


def test_concurrent_sessions_all_complete(browser, server, real_images):
    """Several browser sessions upload at once; every one gets its result."""
    files = real_images["NORMAL"][:2] + real_images["PNEUMONIA"][:2]
    contexts = [browser.new_context() for _ in files]
    pages = [c.new_page() for c in contexts]
    try:
        for p in pages:
            p.goto(server.url)
        for p in pages:
            wait_app_ready(p)
        for p, f in zip(pages, files):
            upload_files(p, [str(f)])  # returns once sent; the server works on all sessions together
        assert all(read_decision(p, timeout_ms=120_000) in ("PNEUMONIA", "NORMAL", "UNCERTAIN") for p in pages)
    finally:
        for c in contexts:
            c.close()
