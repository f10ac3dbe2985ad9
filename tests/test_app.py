"""Headless page tests with Streamlit's AppTest (same process, no browser)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

import model
from model.artifact import REPORT_FILE, WEIGHTS_FILE
from tests.conftest import APP, APP_TIMEOUT as TIMEOUT, dicom_bytes


def upload(at: AppTest, files: list[tuple[str, bytes]]) -> AppTest:
    at.file_uploader(key="uploads").set_value([(n, d, "application/octet-stream") for n, d in files]).run()
    assert not at.exception, at.exception
    return at


def decision(at: AppTest) -> str:
    texts = [m.value for m in at.markdown if m.value.startswith("### Decision")]
    assert len(texts) == 1, texts
    return next(d for d in ("PNEUMONIA", "NORMAL", "UNCERTAIN") if d in texts[0])


def test_sidebar_expected_metrics_are_drawn_after_the_page(at, real_images):
    """Filled at the end of each run (scikit-learn is imported there, not before the first decision),
    on the landing page (which ends with st.stop) and after an upload alike; they follow the threshold."""
    sens = lambda: next(m.value for m in at.sidebar.metric if m.label == "Sensitivity")  # noqa: E731
    assert [m.label for m in at.sidebar.metric] == ["Sensitivity", "Specificity"]
    at.sidebar.slider(key="_threshold_widget").set_value(0.0).run()
    assert sens() == "100.0%"
    upload(at, [("a.jpeg", real_images["NORMAL"][0].read_bytes())])
    assert [m.label for m in at.sidebar.metric] == ["Sensitivity", "Specificity"] and sens() == "100.0%"


def test_app_starts_on_diagnose_with_disclaimer(at):
    assert [t.value for t in at.title] == ["Diagnose"]
    assert any("not a medical device" in i.value for i in at.sidebar.info)
    assert at.session_state["threshold"] == pytest.approx(0.5)  # the model's default threshold


def test_upload_real_image_gives_decision_and_heatmap(at, real_images):
    path = real_images["PNEUMONIA"][0]
    upload(at, [(path.name, path.read_bytes())])
    assert decision(at) in ("PNEUMONIA", "NORMAL", "UNCERTAIN")
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # gauge + side-by-side X-ray / heatmap
    assert any("where the model looked" in c.value for c in at.caption)
    labels = [b.label for b in at.download_button]
    assert {"Result (JSON)", "Result (CSV)", "Overlay (PNG)"} <= set(labels)
    # the record carries the probability the model computes for that file
    [result] = at.session_state["_results"].values()
    assert result.probability == pytest.approx(model.load_model().predict_proba(path)[0], abs=1e-6)


def test_threshold_flips_a_borderline_case(at, real_images):
    path = real_images["NORMAL"][0]
    upload(at, [(path.name, path.read_bytes())])
    p = next(iter(at.session_state["_results"].values())).probability
    at.slider(key="_band_widget").set_value(0.0).run()
    at.slider(key="_threshold_widget").set_value(max(0.0, round(p - 0.01, 2))).run()
    assert decision(at) == "PNEUMONIA"
    at.slider(key="_threshold_widget").set_value(min(1.0, round(p + 0.01, 2))).run()
    assert decision(at) == "NORMAL"
    at.slider(key="_band_widget").set_value(0.05).run()
    assert decision(at) == "UNCERTAIN"


def test_preset_buttons_set_threshold(at, app_model):
    meta = model.read_meta(app_model)
    at.button(key="preset_high_sensitivity").click().run()
    assert at.session_state["threshold"] == pytest.approx(meta.operating_points["high_sensitivity"])
    assert at.slider(key="_threshold_widget").value == pytest.approx(meta.operating_points["high_sensitivity"])


def test_bad_files_get_inline_errors_and_others_still_work(at, real_images):
    good = real_images["NORMAL"][1]
    jpeg = good.read_bytes()
    files = [
        ("corrupt.jpeg", jpeg[: len(jpeg) // 3]),
        ("notes.txt", b"this is not an x-ray"),
        (good.name, jpeg),
        ("scan.dcm", dicom_bytes((np.random.default_rng(0).random((128, 128)) * 4000).astype(np.uint16))),
        ("tiny.png", _png(np.zeros((10, 10), np.uint8))),
        ("sixteen.png", _png((np.random.default_rng(1).random((128, 96)) * 60000).astype(np.uint16))),
    ]
    upload(at, files)
    errors = " ".join(e.value for e in at.error)
    assert "corrupt.jpeg" in errors and "notes.txt" in errors and "tiny.png" in errors
    assert "Traceback" not in errors
    assert len(at.error) == 1  # one compact summary, details in a table (not one box per file)
    assert len(at.dataframe) == 2  # the unreadable files + the results table for the batch
    decisions = at.session_state["_results"]
    assert sum(r.ok for r in decisions.values()) == 3  # jpeg, DICOM and 16-bit PNG analysed
    assert decision(at) in ("PNEUMONIA", "NORMAL", "UNCERTAIN")
    assert "Download all results (CSV)" in [b.label for b in at.download_button]


def test_report_page_renders_and_follows_threshold(at):
    at.switch_page("pages/report.py").run()
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ["Model report"]
    assert len(at.get("plotly_chart")) == 5  # ROC, confusion, PR, histogram, reliability (no history file)
    metric = lambda label: next(m.value for m in at.main.metric if m.label == label)  # noqa: E731
    at.slider(key="_threshold_widget").set_value(0.0).run()
    assert metric("Sensitivity") == "1.000" and metric("Specificity") == "0.000"
    text_low = next(m.value for m in at.markdown if m.value.startswith("At threshold"))
    at.slider(key="_threshold_widget").set_value(1.0).run()
    assert metric("Sensitivity") == "0.000"
    text_high = next(m.value for m in at.markdown if m.value.startswith("At threshold"))
    assert text_low != text_high and "8 of 8 pneumonia films flagged" in text_low


def test_threshold_is_shared_between_pages(at):
    at.slider(key="_threshold_widget").set_value(0.33).run()
    at.switch_page("pages/report.py").run()
    assert at.slider(key="_threshold_widget").value == pytest.approx(0.33)
    assert at.session_state["threshold"] == pytest.approx(0.33)


def test_report_page_loads_another_report(at, app_model):
    at.switch_page("pages/report.py").run()
    other = json.loads((app_model / REPORT_FILE).read_text())
    other["data"]["split"] = "my-hospital"
    at.file_uploader(key="other_report").set_value(("r.json", json.dumps(other).encode(), "application/json")).run()
    assert any("my-hospital" in c.value for c in at.caption)
    at.file_uploader(key="other_report").set_value(("r.json", b"{oops", "application/json")).run()
    assert any("not a usable report" in e.value for e in at.error)


def test_missing_model_shows_a_clear_page(monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_MODEL_DIR", str(tmp_path / "none"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert any("No model found" in e.value for e in at.error)


def test_tampered_model_shows_a_clear_page(monkeypatch, tmp_path, app_model):
    bad = tmp_path / "bad"
    shutil.copytree(app_model, bad)
    (bad / WEIGHTS_FILE).write_bytes((bad / WEIGHTS_FILE).read_bytes()[:-10] + b"0123456789")
    monkeypatch.setenv("CXR_MODEL_DIR", str(bad))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert any("checksum" in e.value for e in at.error)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_disclaimer_names_the_models_own_training_data(at):
    """A retrained model's sidebar names what it was trained on (from its metadata), escaped; the test
    model records nothing, so its sidebar says the populations are unknown without naming any."""
    from types import SimpleNamespace

    from ui.state import disclaimer

    text = next(i.value for i in at.sidebar.info if "not a medical device" in i.value)
    assert "other than the model's training data are unknown" in text and "paediatric" not in text
    meta = SimpleNamespace(training={"data_description": "Adults from [site](https://x.example) *A*"})
    d = disclaimer(SimpleNamespace(clf=SimpleNamespace(meta=meta)))
    from model.report import escape_markdown

    assert f"Trained on: {escape_markdown('Adults from [site](https://x.example) *A*')}." in d and "[site](" not in d


def test_sidebar_model_line_says_whether_the_weights_were_trained_or_re_finalised(at):
    from types import SimpleNamespace

    from ui.state import model_caption

    assert any("trained" in c.value for c in at.sidebar.caption)  # the test model was trained
    meta = SimpleNamespace(architecture="resnet18", input_size=192, created="2026-12-03T10:00:00", weights_sha256="ab" * 32,
                           training={"epochs_run": 0})
    assert "re-finalised 2026-12-03" in model_caption("m", meta) and "trained" not in model_caption("m", meta)
    meta.training = {"epochs_run": 3}
    assert "trained 2026-12-03" in model_caption("m", meta)
