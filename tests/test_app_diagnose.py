"""The Diagnose page (AppTest, same process): flagged input, results kept across pages, the sidebar's
threshold controls, and the viewer's figures (what goes over the websocket)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

import model
from model.classifier import Classifier, Prediction
from model.gate import InputCheck
from tests.conftest import dicom_bytes

REASON = "it is almost uniformly bright (no anatomy)."


@pytest.fixture
def flagging_gate(monkeypatch):
    """The real gate is not in yet: a classifier whose check flags near-white images (as the gate will)."""
    original = Classifier.predict

    def predict(self, images, batch_size=32, heatmaps=False):
        preds = original(self, images, batch_size, heatmaps)
        out = []
        for img, p in zip(images if isinstance(images, (list, tuple)) else [images], preds):
            gray = np.asarray(getattr(img, "gray", img))
            flagged = gray.mean() > 245
            out.append(Prediction(p.probability, InputCheck(bool(flagged), 9.5 if flagged else 0.5, REASON if flagged else None),
                                  p.heatmap))
        return out

    monkeypatch.setattr(Classifier, "predict", predict)


def upload(at: AppTest, files: list[tuple[str, bytes]]) -> AppTest:
    at.file_uploader(key="uploads").set_value([(n, d, "application/octet-stream") for n, d in files]).run()
    assert not at.exception, at.exception
    return at


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def decision_text(at: AppTest) -> str:
    texts = [m.value for m in at.markdown if m.value.startswith("### Decision")]
    assert len(texts) == 1, texts
    return texts[0]


WHITE = png(np.full((256, 256), 255, np.uint8))


def test_flagged_upload_gets_no_decision_but_a_card_and_a_toggle(at, flagging_gate, real_images):
    upload(at, [("white.png", WHITE)])
    assert "NOT ASSESSED" in decision_text(at)
    warning = " ".join(w.value for w in at.warning)
    assert "This does not look like a frontal chest X-ray" in warning and REASON in warning
    assert len(at.get("plotly_chart")) == 0  # no gauge, no heatmap until the user asks
    toggle = at.toggle[0]
    assert toggle.label == "Show the model's output anyway" and toggle.value is False
    toggle.set_value(True).run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 2  # gauge + viewer
    assert "NOT ASSESSED" in decision_text(at)  # the decision itself does not change
    assert any("Unreliable" in c.value for c in at.caption)
    [result] = at.session_state["_results"].values()
    assert result.check.flagged and result.check.reason == REASON
    assert not [e for e in at.expander if "exported" in e.label]  # no re-export check for an image it was not made for


def test_batch_table_and_records_carry_the_check(at, flagging_gate, real_images, app_model):
    good = real_images["NORMAL"][0]
    upload(at, [("white.png", WHITE), (good.name, good.read_bytes())])
    table = at.dataframe[0].value
    assert list(table["decision"])[0] == "NOT ASSESSED" and list(table["input check"])[0] == REASON
    assert list(table["input check"])[1] == "ok"
    from model.results import json_record, record, records_csv

    clf = model.load_model(app_model)
    results = list(at.session_state["_results"].values())
    recs = [record(r, clf, 0.5, 0.05) for r in results]
    rows = list(csv.DictReader(io.StringIO(records_csv(recs).decode())))
    assert rows[0]["decision"] == "NOT_ASSESSED" and rows[0]["input_flagged"] == "True"
    assert rows[0]["input_check_reason"] == REASON and float(rows[0]["input_check_score"]) == 9.5
    assert rows[1]["input_flagged"] == "False" and rows[1]["decision"] in ("PNEUMONIA", "NORMAL", "UNCERTAIN")
    js = json.loads(json.dumps(json_record(recs[0], results[0])))
    assert js["decision"] == "NOT_ASSESSED" and js["input_check"] == {"flagged": True, "score": 9.5, "reason": REASON}
    assert "not a medical device" in js["disclaimer"]


def test_uploads_survive_a_visit_to_the_report_page(at, real_images):
    a, b = real_images["NORMAL"][0], real_images["PNEUMONIA"][0]
    upload(at, [(a.name, a.read_bytes()), (b.name, b.read_bytes())])
    before = {r.name: r.probability for r in at.session_state["_results"].values()}
    at.switch_page("pages/report.py").run()
    assert [t.value for t in at.title] == ["Model report"]
    at.switch_page("pages/diagnose.py").run()
    assert not at.exception, at.exception
    assert {r.name: r.probability for r in at.session_state["_results"].values()} == before
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 2
    assert decision_text(at)
    assert any("earlier result" in c.value for c in at.caption)
    assert not any("of films show pneumonia" in c.value for c in at.caption)  # the fixture's model.json does not say
    # a new upload adds to the restored results; "Clear results" empties the page
    c = real_images["NORMAL"][1]
    upload(at, [(c.name, c.read_bytes())])
    assert len(at.session_state["_results"]) == 3
    at.button(key="clear_results").click().run()
    assert len(at.session_state["_results"]) == 0 or not any("earlier result" in c.value for c in at.caption)


def test_removing_a_file_from_the_uploader_drops_its_result(at, real_images):
    a, b = real_images["NORMAL"][0], real_images["PNEUMONIA"][0]
    upload(at, [(a.name, a.read_bytes()), (b.name, b.read_bytes())])
    upload(at, [(a.name, a.read_bytes())])
    assert [r.name for r in at.session_state["_results"].values()] == [a.name]


def test_dicom_shows_technical_tags_only(at):
    data = dicom_bytes((np.random.default_rng(0).random((128, 128)) * 4000).astype(np.uint16))
    upload(at, [("scan.dcm", data)])
    text = " ".join(m.value for m in at.markdown)
    assert "modality: `DX`" in text and "photometric interpretation: `MONOCHROME2`" in text
    [result] = at.session_state["_results"].values()
    technical = {"Modality", "BodyPartExamined", "ViewPosition", "PhotometricInterpretation", "TransferSyntaxUID",
                 "BitsStored", "Rows", "Columns"}
    assert set(result.dicom) <= technical and not any("Patient" in k for k in result.dicom)


def test_threshold_three_decimals_reset_and_presets_shown_once(at, app_model):
    meta = model.read_meta(app_model)
    labels = [b.label for b in at.sidebar.button]
    # the test model stores "screening" = the default 0.5: one button for that value, not two
    assert sum(f"{meta.threshold:.3f}" in lab for lab in labels) == 1
    assert at.slider(key="_threshold_widget").step == pytest.approx(0.001)
    at.slider(key="_threshold_widget").set_value(0.123).run()
    assert at.session_state["threshold"] == pytest.approx(0.123)
    at.button(key="preset_default").click().run()
    assert at.session_state["threshold"] == pytest.approx(meta.threshold)
    assert at.slider(key="_threshold_widget").value == pytest.approx(meta.threshold)


def test_gauge_uses_the_threshold_scale(at, real_images):
    path = real_images["PNEUMONIA"][0]
    upload(at, [(path.name, path.read_bytes())])
    [result] = at.session_state["_results"].values()
    gauge = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]
    assert gauge["value"] == pytest.approx(result.probability)
    assert gauge["gauge"]["axis"]["range"] == [0, 1]
    assert gauge["number"]["valueformat"] == ".3f"


def test_re_export_check_runs_when_asked_and_its_verdict_matches_the_scores(at, real_images, app_model):
    from model.stability import export_stability

    path = real_images["PNEUMONIA"][0]
    upload(at, [(path.name, path.read_bytes())])
    assert len([e for e in at.expander if "exported" in e.label]) == 1
    assert "_stability" not in at.session_state or not at.session_state["_stability"]  # nothing computed until asked
    [button] = [b for b in at.button if b.key.startswith("stability_")]
    button.click().run()
    assert not at.exception, at.exception
    [result] = at.session_state["_results"].values()
    [s] = at.session_state["_stability"].values()
    assert s == export_stability(model.load_model(app_model), result.display)  # the display copy, scored as an upload
    [table] = [d for d in at.dataframe if len(d.value) == 1 + len(s.scores)]
    assert list(table.value["P(pneumonia)"])[1:] == pytest.approx(list(s.scores.values()))
    t, b = at.session_state["threshold"], at.session_state["band"]
    verdicts = [e.value for e in [*at.success, *at.warning] if "re-export" in e.value]
    assert len(verdicts) == 1 and verdicts[0].startswith("**Stable") == s.stable(t, b)


# ---- the viewer's figure: small on the wire, aligned views --------------------------------------


def test_viewer_sends_a_small_jpeg_not_pixel_arrays(real_images):
    from model.results import fit_within
    from ui.viewer import xray_figure

    rng = np.random.default_rng(0)
    big = np.asarray(Image.open(real_images["PNEUMONIA"][0]).convert("L").resize((2000, 1800), Image.BICUBIC))
    display = fit_within(big, 1024)
    assert max(display.shape) == 1024
    fig = xray_figure(display, rng.random((192, 192)).astype(np.float32), 0.5)
    payload = fig.to_json()
    assert len(payload) < 400_000  # was ~8.6 MB for a 2000 px upload (the image twice as raw pixels)
    images = [t for t in fig.data if t.type == "image"]
    assert len(images) == 2 and all(t.source.startswith("data:image/jpeg;base64,") for t in images)
    assert all(t.z is None for t in images)
    heat = next(t for t in fig.data if t.type == "heatmap")
    assert max(np.asarray(heat.z).shape) <= 48 and heat.colorbar.title.text == "influence"


def test_viewer_axes_reset_together_and_keep_aspect():
    from ui.viewer import xray_figure

    display = np.zeros((300, 200), np.uint8)
    lay = xray_figure(display, np.zeros((192, 192), np.float32)).layout
    assert lay.xaxis2.matches == "x" and lay.yaxis2.matches == "y"
    assert lay.yaxis.scaleanchor == "x" and lay.yaxis2.scaleanchor == "x2"  # each panel keeps its own aspect
    assert list(lay.xaxis.range) == list(lay.xaxis2.range) == [-0.5, 199.5]
    assert list(lay.yaxis.range) == list(lay.yaxis2.range) == [299.5, -0.5]  # row 0 at the top


def test_overlay_png_is_the_display_size():
    from ui.viewer import overlay_png

    gray = np.full((120, 90), 100, np.uint8)
    im = Image.open(io.BytesIO(overlay_png(gray, np.ones((12, 12), np.float32), 0.5)))
    assert im.size == (90, 120) and im.mode == "RGB"
    assert np.asarray(im)[..., 0].mean() > np.asarray(im)[..., 2].mean()  # 1.0 is red in jet


def test_probability_says_which_class_mix_it_holds_for(monkeypatch, app_model, real_images, tmp_path):
    import shutil

    from model.artifact import META_FILE
    from tests.conftest import APP, APP_TIMEOUT

    d = tmp_path / "m"
    shutil.copytree(app_model, d)
    meta = json.loads((d / META_FILE).read_text())
    meta["metrics"] = {**meta.get("metrics", {}), "prevalence": 0.7408}
    (d / META_FILE).write_text(json.dumps(meta))
    monkeypatch.setenv("CXR_MODEL_DIR", str(d))
    at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT).run()
    a = real_images["NORMAL"][0]
    upload(at, [(a.name, a.read_bytes())])
    assert any(c.value.startswith("P(pneumonia) = ") and "calibrated where 74% of films show pneumonia" in c.value
               for c in at.caption), [c.value for c in at.caption]
