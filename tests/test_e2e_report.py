"""Model report page in a real browser: the error gallery opens, a thumbnail shows its film with the heatmap.

Same server pattern as tests/test_e2e_browser.py; screenshots go to test-artifacts/ (ignored by git).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.harness import wait_idle
from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.browser


def _wait_count(page, locator, ok, timeout_s: float = 60.0) -> None:
    for _ in range(int(timeout_s * 4)):
        if ok(locator.count()):
            return
        page.wait_for_timeout(250)


def test_gallery_thumbnail_opens_film_with_heatmap(page):
    page.get_by_role("link", name="Model report").click()
    page.get_by_text("Where it goes wrong").first.wait_for(timeout=60_000)
    wait_idle(page)
    page.get_by_text("Show the error gallery").click()
    thumbs = page.get_by_role("button", name=re.compile(r"^P = \d\.\d{3}$"))
    thumbs.first.wait_for(timeout=60_000)
    wait_idle(page)
    assert 1 <= thumbs.count() <= 24
    assert page.get_by_text(re.compile(r"fall in the uncertain band|uncertain band is off")).count() >= 1
    images = page.locator('[data-testid="stImage"]')
    # thumbnails stream in after the buttons: wait until every thumbnail has its image
    _wait_count(page, images, lambda n: n >= thumbs.count())
    gallery_images = images.count()
    label = thumbs.first.inner_text()
    thumbs.first.click()
    page.get_by_text("Where the model looked (Grad-CAM").first.wait_for(timeout=60_000)
    wait_idle(page)
    _wait_count(page, images, lambda n: n >= gallery_images + 2)
    assert images.count() == gallery_images + 2  # film + heatmap overlay
    # the detail names the film and its score, as plain text
    assert page.get_by_text(re.compile(r"(train|val|test)/(NORMAL|PNEUMONIA)/\S+\.jpe?g")).count() >= 1
    assert page.get_by_text(re.compile(rf"P\(pneumonia\) = {re.escape(label.split('= ')[1])} in the report")).count() == 1
    page.screenshot(path=str(ARTIFACTS / "e2e_report_gallery.png"), full_page=True)
    page.get_by_role("button", name="Close").click()
    page.get_by_text("Where the model looked (Grad-CAM").first.wait_for(state="detached", timeout=30_000)


def test_figures_download_says_what_the_page_shows(page):
    page.get_by_role("link", name="Model report").click()
    button = page.get_by_role("button", name="Figures at this threshold (JSON)")
    button.wait_for(timeout=60_000)
    wait_idle(page)
    with page.expect_download() as info:
        button.click()
    figures = json.loads(Path(info.value.path()).read_text())
    cm, pv = figures["at_threshold"]["confusion_matrix"], figures["at_prevalence"]
    assert sum(cm.values()) == figures["n"] and cm["tp"] + cm["fn"] == figures["n_pneumonia"]
    # the same threshold's counts and the same prevalence's PPV/NPV as the page states them
    assert page.get_by_text(f"{cm['tp']} of {cm['tp'] + cm['fn']} pneumonia films flagged").count() == 1
    assert pv["prevalence"] == pytest.approx(0.10)  # the page's default
    sentence = page.get_by_text(re.compile(r"^At 10\.0% prevalence")).inner_text()
    assert f"PPV {pv['ppv']:.3f}" in sentence and f"NPV {pv['npv']:.3f}" in sentence
