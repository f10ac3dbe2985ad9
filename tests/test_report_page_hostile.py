"""The report page with hostile reports (AppTest, no browser): clear messages, and report strings shown as text."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from model.artifact import REPORT_FILE
from model.report import escape_markdown
from tests.conftest import make_artifact_with_report
from tests.test_report_validation import MALFORMED

APP = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")
TIMEOUT = 180
HOSTILE_NAME = "![pixel](https://attacker.example/pixel.png) [click](https://attacker.example/) <img src=https://attacker.example/i.png>"
HOSTILE_SPLIT = "val :material/warning: **bold** $x$"


@pytest.fixture(scope="module")
def app_model(tmp_path_factory, data_dir) -> Path:
    return make_artifact_with_report(tmp_path_factory.mktemp("hostile_model"), data_dir)


def report_page(monkeypatch, model_dir: Path) -> AppTest:
    monkeypatch.setenv("CXR_MODEL_DIR", str(model_dir))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    at.switch_page("pages/report.py").run()
    assert not at.exception, at.exception
    return at


def test_hostile_strings_are_rendered_as_plain_text(monkeypatch, app_model):
    at = report_page(monkeypatch, app_model)
    other = json.loads((app_model / REPORT_FILE).read_text())
    other["model"]["name"], other["data"]["split"] = HOSTILE_NAME, HOSTILE_SPLIT
    at.file_uploader(key="other_report").set_value(("r.json", json.dumps(other).encode(), "application/json")).run()
    assert not at.exception, at.exception
    caption = next(c.value for c in at.caption if "Scores of" in c.value)
    assert escape_markdown(HOSTILE_NAME) in caption and escape_markdown(HOSTILE_SPLIT) in caption
    for live in (r"!\[pixel", r"\]\(https", r"<img", r":material", r"\*\*bold"):  # not preceded by a backslash
        assert not re.search(r"(?<!\\)" + live, caption), live  # no image, link, HTML, icon or emphasis left live
    shown = [e.value for e in at.main.markdown] + [c.value for c in at.caption] + [e.value for e in at.error]
    assert not any("![pixel](" in s for s in shown)


@pytest.mark.parametrize("name", ["nested 100,000 deep (list)", "score NaN", "label y a string", "auc a string",
                                  "ci95 strings", "data a string", "top-level list"])
def test_malformed_upload_shows_a_message(monkeypatch, app_model, name):
    at = report_page(monkeypatch, app_model)
    raw, fragment = MALFORMED[name]
    at.file_uploader(key="other_report").set_value(("r.json", raw, "application/json")).run()
    assert not at.exception, at.exception
    assert any("not a usable report" in e.value for e in at.error)
    assert len(at.get("plotly_chart")) >= 5  # the model's own report is still shown


@pytest.mark.parametrize("raw", [MALFORMED["nested 100,000 deep (object)"][0], MALFORMED["score Infinity"][0]])
def test_bad_report_json_in_the_model_directory(monkeypatch, tmp_path, app_model, data_dir, raw):
    bad = tmp_path / "bad"
    shutil.copytree(app_model, bad)
    (bad / REPORT_FILE).write_bytes(raw)
    monkeypatch.setenv("CXR_MODEL_DIR", str(bad))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    # the model still serves: Diagnose scores an upload, the sidebar says what is missing and why
    assert any("report.json in the model directory is not usable" in w.value for w in at.sidebar.warning)
    film = sorted((data_dir / "val" / "NORMAL").iterdir())[0]
    at.file_uploader(key="uploads").set_value([("a.jpeg", film.read_bytes(), "image/jpeg")]).run()
    assert not at.exception, at.exception
    assert any(m.value.startswith("### Decision") for m in at.markdown)
    # the report page names the problem and still takes another report
    at.switch_page("pages/report.py").run()
    assert any("is not usable" in e.value for e in at.error), [e.value for e in at.error]
    at.file_uploader(key="other_report").set_value(("r.json", (app_model / REPORT_FILE).read_bytes(), "application/json")).run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) >= 5
