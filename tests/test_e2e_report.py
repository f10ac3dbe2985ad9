"""Model report page in a real browser: the error gallery opens, a thumbnail shows its film with the heatmap.

Same server pattern as tests/test_e2e_browser.py; screenshots go to test-artifacts/ (ignored by git).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.harness import CHROMIUM, ROOT, StreamlitServer, chromium, wait_app_ready, wait_idle
from tests.conftest import IN_CI, make_artifact_with_report

pytestmark = pytest.mark.browser
ARTIFACTS = ROOT / "test-artifacts"


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
    """The shipped model when present (its report's files live under the data folder), else a random model."""
    model_dir = ROOT / "assets" / "model"
    if not (model_dir / "model.json").is_file():
        model_dir = make_artifact_with_report(tmp_path_factory.mktemp("e2e_report_model"), data_dir)
    with StreamlitServer(model_dir) as s:  # the data folder: $CXR_DATA_DIR or ../shared/data/chest_xray, as in tests
        yield s


@pytest.fixture
def page(browser, server):
    ARTIFACTS.mkdir(exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    p = ctx.new_page()
    p.goto(server.url)
    wait_app_ready(p, timeout_ms=300_000)  # generous: shared CI/dev machines start torch slowly
    yield p
    ctx.close()


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
    gallery_images = page.locator('[data-testid="stImage"]').count()
    label = thumbs.first.inner_text()
    thumbs.first.click()
    page.get_by_text("Where the model looked (Grad-CAM").first.wait_for(timeout=60_000)
    wait_idle(page)
    assert page.locator('[data-testid="stImage"]').count() == gallery_images + 2  # film + heatmap overlay
    # the detail names the film and its score, as plain text
    assert page.get_by_text(re.compile(r"(train|val|test)/(NORMAL|PNEUMONIA)/\S+\.jpe?g")).count() >= 1
    assert page.get_by_text(re.compile(rf"P\(pneumonia\) = {re.escape(label.split('= ')[1])} in the report")).count() == 1
    page.screenshot(path=str(ARTIFACTS / "e2e_report_gallery.png"), full_page=True)
    page.get_by_role("button", name="Close").click()
    page.get_by_text("Where the model looked (Grad-CAM").first.wait_for(state="detached", timeout=30_000)
