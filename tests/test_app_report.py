"""Model report page (AppTest, no browser): error gallery, model card from metadata, gate and faithfulness tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import model
from model.artifact import META_FILE
from model.exports import LABELS
from tests.conftest import APP, APP_TIMEOUT as TIMEOUT
from ui import model_card as card

REPORT = "pages/report.py"





def variant(src: Path, dest: Path, **fields) -> Path:
    """A copy of the artifact whose model.json carries extra or changed fields (the weights checksum still holds)."""
    shutil.copytree(src, dest)
    meta = json.loads((dest / META_FILE).read_text())
    for key, value in fields.items():
        meta[key] = {**meta.get(key, {}), **value} if isinstance(value, dict) and isinstance(meta.get(key), dict) else value
    (dest / META_FILE).write_text(json.dumps(meta))
    return dest


def fit_real_gate(d: Path) -> None:
    import torch

    from training.fit_gate import fit_and_store

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (24, 1, 64, 64), generator=g, dtype=torch.uint8)
    fit_and_store(d, imgs, torch.tensor([0, 1] * 12), imgs[::2])


def variant_in_place(d: Path, **fields) -> None:
    meta = json.loads((d / META_FILE).read_text())
    for key, value in fields.items():
        meta[key] = {**meta.get(key, {}), **value}
    (d / META_FILE).write_text(json.dumps(meta))


def open_report(monkeypatch, model_dir: Path, data: Path | None = None) -> AppTest:
    monkeypatch.setenv("CXR_MODEL_DIR", str(model_dir))
    if data is not None:
        monkeypatch.setenv("CXR_DATA_DIR", str(data))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page(REPORT).run()
    assert not at.exception, at.exception
    return at


def all_text(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "text", "success", "error") for e in at.get(kind)]
    return "\n".join(str(p) for p in parts)


def test_gallery_shows_errors_and_a_heatmap_on_click(monkeypatch, app_model, data_dir):
    at = open_report(monkeypatch, app_model, data_dir)
    at.slider(key="_band_widget").set_value(0.1).run()
    at.toggle(key="gallery_open").set_value(True).run()
    assert not at.exception, at.exception
    text = all_text(at)
    assert "uncertain band" in text and "false negatives" in text and "of the 16 in this report" in text
    report = json.loads((app_model / "report.json").read_text())
    t = at.session_state["threshold"]
    n_uncertain = sum(abs(it["score"] - t) < 0.1 for it in report["items"])
    assert f"**{n_uncertain}** films" in next(m.value for m in at.markdown if m.value.startswith("At threshold"))
    fn = [it for it in report["items"] if it["y"] == 1 and it["score"] < t]
    fp = [it for it in report["items"] if it["y"] == 0 and it["score"] >= t]
    # a random-weight model errs on one class or the other; show the class that has errors
    kind = "fn" if fn else "fp"
    wrong = fn or fp
    assert wrong, "the random model should get something wrong at its threshold"
    at.segmented_control(key="gallery_kind").set_value(kind).run()
    thumbs = sorted((b for b in at.button if b.key and b.key.startswith(f"thumb_{kind}_")),
                    key=lambda b: int(b.key.rsplit("_", 1)[1]))  # the tree lists the grid column by column
    assert len(thumbs) == min(len(wrong), 24)
    # most confidently wrong first
    scores = [float(b.label.split("=")[1]) for b in thumbs]
    assert scores == sorted(scores, reverse=(kind == "fp"))
    before = len(at.get("image"))
    thumbs[0].click().run()
    assert not at.exception, at.exception
    assert len(at.get("image")) == before + 2  # the film and its heatmap overlay
    first = sorted(wrong, key=lambda it: -it["score"] if kind == "fp" else it["score"])[0]
    assert any(first["file"] in x.value for x in at.text)  # file name shown as plain text
    at.button(key="gallery_close").click().run()
    assert len(at.get("image")) == before


def test_gallery_without_data_says_how_to_get_it(monkeypatch, app_model, tmp_path):
    at = open_report(monkeypatch, app_model, tmp_path / "no-data-here")
    at.toggle(key="gallery_open").set_value(True).run()
    assert not at.exception, at.exception
    assert any("CXR_DATA_DIR" in i.value and "no-data-here" in i.value for i in at.info)
    assert not [b for b in at.button if b.key and b.key.startswith("thumb_")]


def test_model_card_follows_metadata(monkeypatch, app_model, tmp_path):
    custom = variant(app_model, tmp_path / "custom", training={
        "data": "/data/hospital_x/export.csv", "data_description": "Adult PA chest films from *Hospital X*, 2019-2021",
        "train_images": 321, "val_images": 80, "val_patients": 60})
    at = open_report(monkeypatch, custom)
    cards = [m.value for m in at.markdown if "**Model**" in m.value]
    assert len(cards) == 1
    assert "Guangzhou" not in cards[0] and "Kermany" not in cards[0]
    assert "Hospital X" in cards[0] and r"\*Hospital X\*" in cards[0]  # metadata is text, not markup
    assert "321 training and 80 validation images" in cards[0]
    assert "one age band" not in cards[0]
    # the fixture's model has screening == default: listed once
    points = cards[0].split("Operating points")[1]
    assert points.count("0.500") == 1 and r"default \(screening\)" in points


def test_model_card_without_description_names_the_data_folder(monkeypatch, app_model, tmp_path):
    plain = variant(app_model, tmp_path / "plain", training={"data": "/srv/my_films"})
    at = open_report(monkeypatch, plain)
    [text] = [m.value for m in at.markdown if "**Model**" in m.value]
    assert "my\\_films" in text and "Guangzhou" not in text and "recorded no description" in text


def test_official_val_folder_is_not_called_a_carved_split(monkeypatch, app_model):
    at = open_report(monkeypatch, app_model)  # the fixture's report scores the official 16-image val folder
    assert not any("carved from the training folder" in i.value for i in at.info)
    assert any("only 16 images" in i.value for i in at.info)
    assert any("independent check" in c.value for c in at.caption)


def test_prevalence_note_only_from_a_proportion_in_the_metadata(monkeypatch, app_model, tmp_path):
    """The report says what class mix its probabilities hold for, from model.json; hostile or missing values say nothing."""
    at = open_report(monkeypatch, variant(app_model, tmp_path / "p", metrics={"prevalence": 0.7408}))
    notes = [c.value for c in at.caption if "calibrated on films of which 74% show pneumonia" in c.value]
    assert len(notes) == 1 and "a shown 0.85 is about 0.18" in notes[0]  # Bayes on the odds, at 10%
    assert not any("calibrated on films of which" in c.value for c in open_report(monkeypatch, app_model).caption)
    meta = model.read_meta(app_model)
    for bad in ("0.74", True, float("nan"), float("inf"), 0.0, 1.0, 7.4, None, [0.7]):
        meta.metrics = {"prevalence": bad}
        assert meta.prevalence is None and card.prevalence_note(meta) is None, bad
    meta.metrics = ["not", "a", "dict"]
    assert meta.prevalence is None


def test_predictive_values_follow_the_prevalence_and_the_threshold(monkeypatch, app_model):
    """PPV/NPV at the prevalence the user sets, checked against the report's films reweighted to that class mix."""
    import numpy as np
    from sklearn.metrics import precision_score

    at = open_report(monkeypatch, app_model)
    report = json.loads((app_model / "report.json").read_text())
    y = np.array([it["y"] for it in report["items"]])
    s = np.array([it["score"] for it in report["items"]])

    def expected(pi: float, t: float) -> str:
        w = np.where(y == 1, pi / y.mean(), (1 - pi) / (1 - y.mean()))
        pred = (s >= t).astype(int)
        return (f"**PPV {precision_score(y, pred, sample_weight=w, zero_division=0):.3f}** and "
                f"**NPV {precision_score(y, pred, pos_label=0, sample_weight=w, zero_division=0):.3f}**")

    def sentence() -> str:
        return next(c.value for c in at.caption if c.value.startswith("At ") and "prevalence" in c.value)

    assert sentence().startswith("At 10.0% prevalence") and expected(0.10, at.session_state["threshold"]) in sentence()
    at.number_input(key="prevalence_pct").set_value(40.0).run()
    assert sentence().startswith("At 40.0% prevalence") and expected(0.40, at.session_state["threshold"]) in sentence()
    before = sentence()
    t = round(float(np.median(s)), 2)  # a threshold that splits this report's films
    at.slider(key="_threshold_widget").set_value(t).run()
    assert at.session_state["threshold"] == pytest.approx(t)
    assert expected(0.40, t) in sentence() and sentence() != before
    [button] = [b for b in at.download_button if b.label == "Figures at this threshold (JSON)"]
    assert "PPV/NPV at the prevalence" in button.help


def test_gate_and_faithfulness_tables_when_present(monkeypatch, app_model, tmp_path):
    gate = {"method": "mahalanobis", "threshold": 123.4, "val_flag_rate": 0.008,
            "ood_eval": {"natural_photo": {"n": 26, "flag_rate": 1.0, "auroc": 0.999},
                         "adult_chest": {"n": 17, "flag_rate": 0.35, "auroc": 0.8}}}
    d = variant(app_model, tmp_path / "gated")
    fit_real_gate(d)  # a gate block needs its gate.safetensors (checksummed); then add the figures to show
    variant_in_place(d, gate=gate)
    (d / "faithfulness.json").write_text(json.dumps({"rows": [
        {"method": "gradcam", "layer": "layer4", "road_combined": 0.12},
        {"method": "gradcam", "layer": "layer3", "road_combined": 0.18}]}))
    at = open_report(monkeypatch, d)
    subheaders = [s.value for s in at.subheader]
    assert "Input gate" in subheaders and "Heatmap faithfulness" in subheaders
    assert any("input gate refuses images unlike the training films" in m.value for m in at.markdown)
    assert any("Adult frontal chest films: 35% flagged" in m.value for m in at.markdown)
    frames = [f.value for f in at.dataframe]
    groups = next(f for f in frames if "group" in f.columns)
    assert list(groups["group"]) == ["natural_photo", "adult_chest"]
    assert list(next(f for f in frames if "layer" in f.columns)["layer"]) == ["layer4", "layer3"]


def test_no_gate_or_faithfulness_sections_when_absent(monkeypatch, app_model):
    at = open_report(monkeypatch, app_model)
    subheaders = [s.value for s in at.subheader]
    assert "Input gate" not in subheaders and "Heatmap faithfulness" not in subheaders


def test_independent_figures_say_whose_weights_they_measured(monkeypatch, app_model, tmp_path):
    """Figures measured by others travel beside the weights; a row of the parent model never reads as this one's."""
    d = variant(app_model, tmp_path / "child", training={"initialised_from": {"weights_sha256": "ab" * 32}})
    rows = [{"model": "parent-v1", "weights_sha256": "ab" * 32, "data": "the official test split", "measured_by": "*us*",
             "auc": 0.984, "accuracy": 0.939, "sensitivity": 0.987, "specificity": 0.859, "ece": 0.116}]
    (d / card.INDEPENDENT_FILE).write_text(json.dumps({"evaluations": rows}))
    at = open_report(monkeypatch, d)
    assert "Measured independently" in [s.value for s in at.subheader]
    table = next(f.value for f in at.dataframe if "measured by" in f.value.columns)
    assert list(table["weights"]) == ["the model this one was fine-tuned from (not these weights)"]
    [line] = [m.value for m in at.markdown if "**Measured independently**" in m.value]
    assert "no figures of these weights" in line and "auc 0.984" in line and r"\*us\*" not in line

    meta = json.loads((d / META_FILE).read_text())
    rows.append({**rows[0], "model": "this", "weights_sha256": meta["weights_sha256"], "auc": 0.991})
    (d / card.INDEPENDENT_FILE).write_text(json.dumps(rows))  # a bare list is accepted too
    at = open_report(monkeypatch, d)
    [line] = [m.value for m in at.markdown if "**Measured independently**" in m.value]
    assert "auc 0.991" in line and "no figures" not in line


def test_hostile_independent_file_is_ignored(monkeypatch, app_model, tmp_path):
    d = variant(app_model, tmp_path / "hostile")
    (d / card.INDEPENDENT_FILE).write_text("[" * 100_000)
    at = open_report(monkeypatch, d)
    assert "Measured independently" not in [s.value for s in at.subheader]
    assert card.independent_rows(type("M", (), {"weights_sha256": "x", "training": {}})(), d) == []


def _robustness(sha: str, perturbations: dict) -> str:
    return json.dumps({"n_films": 1034, "models": {"model": {"name": "m", "weights_sha256": sha, "perturbations": perturbations}}})


def test_robustness_table_from_the_file_beside_the_weights(monkeypatch, app_model, tmp_path):
    d = variant(app_model, tmp_path / "robust")
    sha = json.loads((d / META_FILE).read_text())["weights_sha256"]
    figures = {"sharpen": {"mean": 0.0033, "max": 0.112, "over_target": 4, "flips": 4, "confident_flips": 0},
               "down2_up": {"mean": 0.0017, "max": 0.071, "over_target": 0, "flips": 0, "confident_flips": 0}}
    (d / card.ROBUSTNESS_FILE).write_text(_robustness(sha, figures))
    at = open_report(monkeypatch, d)
    assert "Robustness to how a film was exported" in [s.value for s in at.subheader]
    assert any("1034 validation films" in c.value for c in at.caption)
    assert not any("other weights" in w.value for w in at.warning)
    table = next(f.value for f in at.dataframe if "re-export" in f.value.columns)
    assert list(table["re-export"]) == [LABELS["sharpen"], LABELS["down2_up"]]
    assert list(table["max |change in P|"]) == [0.112, 0.071] and list(table["films over 0.10"]) == [4, 0]

    (d / card.ROBUSTNESS_FILE).write_text(_robustness("ab" * 32, figures))  # left from other weights: said so
    at = open_report(monkeypatch, d)
    assert any("other weights" in w.value for w in at.warning)


@pytest.mark.parametrize("content", ["[" * 100_000, "not json", json.dumps({"models": []}),
                                     json.dumps({"models": {"model": {"perturbations": ["sharpen"]}}}),
                                     json.dumps({"models": {"model": {"perturbations": {"x": "y"}}}})])
def test_hostile_robustness_file_costs_the_section_not_the_page(monkeypatch, app_model, tmp_path, content):
    d = variant(app_model, tmp_path / "hostile")
    (d / card.ROBUSTNESS_FILE).write_text(content)
    at = open_report(monkeypatch, d)  # asserts no exception
    assert "Robustness to how a film was exported" not in [s.value for s in at.subheader]
    assert "Model card" in [s.value for s in at.subheader]


def test_robustness_rows_keep_only_finite_numbers(tmp_path):
    (tmp_path / card.ROBUSTNESS_FILE).write_text(
        '{"n_films": true, "models": {"model": {"weights_sha256": "x", "perturbations": {"<b>odd</b>": '
        '{"mean": NaN, "max": "0.5", "flips": true, "over_target": 3}}}}}')
    rows, info = card.robustness_table(type("M", (), {"weights_sha256": "x"})(), tmp_path)
    assert rows == [{"re-export": "<b>odd</b>", "mean |change in P|": None, "max |change in P|": None,
                     "films over 0.10": 3, "decisions flipped": None, "flipped, neither call UNCERTAIN": None}]
    assert info == {"n_films": None, "this_model": True}


# ---- pure helpers ----------------------------------------------------------------------------------

def test_kermany_credit_only_for_that_data():
    assert card.is_kermany({"data": "../shared/data/chest_xray"})
    assert card.is_kermany({"data": "/x/y", "data_description": "Kermany et al. 2018 pediatric films"})
    assert not card.is_kermany({"data": "/data/chest_xray_adult.csv"})
    assert "Guangzhou" in card.data_line({"data": "../shared/data/chest_xray/", "train_images": 4173})
    assert "Guangzhou" not in card.data_line({"data": "mine.csv", "data_description": "my films"})


def test_operating_points_fold_duplicates():
    class M:
        threshold = 0.9146
        operating_points = {"youden": 0.6, "high_sensitivity": 0.96, "screening": 0.9146}

    assert card.operating_points(M()) == {"default (screening)": 0.9146, "youden": 0.6, "high_sensitivity": 0.96}


def test_model_line_names_the_input_steps_the_metadata_sets():
    class M:
        architecture, input_size, resize, weights_sha256, training = "resnet18", 192, "squash", "ab" * 32, {}
        equalize, spectrum = True, [1.0] * 25

    assert "histogram-equalised and spectrum-matched" in card.model_line("m", M())
    M.equalize_sigma, M.band_limit = 2.0, 0.35
    assert ("histogram-equalised (mapping from a 2 px smoothed copy), spectrum-matched to its training films and "
            "low-passed (Gaussian, sigma 0.35 x Nyquist)") in card.model_line("m", M())
    M.equalize, M.spectrum, M.band_limit = False, None, None
    line = card.model_line("m", M())
    assert "equalised" not in line and "spectrum" not in line and "low-passed" not in line


def test_md_escape_neutralises_markup():
    assert card.md_escape("**x** [a](http://e) :red[y] $z$\n<b>") == r"\*\*x\*\* \[a\]\(http\://e\) \:red\[y\] \$z\$ \<b\>"
    assert card.md_escape("my-hospital 2.0") == "my-hospital 2.0"
