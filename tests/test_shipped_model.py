"""Regression test for the model in assets/model: it loads, and scoring a fixed sample of its validation
images reproduces the scores and metrics recorded in its report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import model
from model.decision import DEFAULT_BAND
from model.metrics import threshold_metrics

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "model"


@pytest.fixture(scope="module")
def shipped():
    assert (SHIPPED / "model.json").is_file(), "no model shipped in assets/model"
    return model.load_model(SHIPPED, bf16=False)  # verifies the weights checksum; fp32: the recorded scores are


@pytest.fixture(scope="module")
def report():
    return json.loads((SHIPPED / "report.json").read_text())


def test_metadata_is_complete(shipped, report):
    meta = shipped.meta
    assert meta.class_names == ["NORMAL", "PNEUMONIA"] and meta.in_chans == 1
    assert {"youden", "high_sensitivity"} <= set(meta.operating_points)
    assert 0 < meta.temperature < 20 and 0 < meta.threshold < 1
    assert meta.metrics["auc"] == pytest.approx(report["auc"]["value"])
    assert meta.metrics["prevalence"] == pytest.approx(np.mean([it["y"] for it in report["items"]]))  # the calibration's class mix
    assert report["model"]["weights_sha256"] == meta.weights_sha256
    assert (SHIPPED / "weights.safetensors").stat().st_size <= 50 * 2**20


def test_fixed_sample_reproduces_recorded_scores(shipped, report, data_dir):
    items = sorted(report["items"], key=lambda it: it["file"])[::16]  # fixed, spread over both classes
    assert {it["y"] for it in items} == {0, 1}
    probs = shipped.predict_proba([data_dir / it["file"] for it in items])
    np.testing.assert_allclose(probs, [it["score"] for it in items], atol=2e-4)


def test_bf16_serving_stays_near_fp32(shipped, report, data_dir):
    """Where bf16 serves (bf16-native CPUs, CUDA) the score may move only by rounding, never the decision
    (measured on all 1034 validation films: max |dp| 0.0073, no decision changed). Runs on any CPU (slowly
    where bf16 is emulated), so the check does not depend on the machine CI lands on."""
    items = sorted(report["items"], key=lambda it: it["file"])[::8]
    films = [data_dir / it["file"] for it in items]
    fast = model.load_model(SHIPPED, bf16=True)
    assert fast.bf16 and not shipped.bf16
    p16, p32 = fast.predict_proba(films), shipped.predict_proba(films)
    assert np.abs(p16 - p32).max() <= 0.02
    assert 0 < np.abs(p16 - p32).max()  # it really ran in another precision
    t = shipped.threshold
    near = np.abs(p32 - t) > 0.02  # films farther from the threshold than the rounding can move
    assert ((p16 >= t) == (p32 >= t))[near].all()
    assert all(p.dtype == torch.bfloat16 for p in fast._net.parameters())  # stored in bf16, not re-cast per call
    from model.artifact import load_artifact
    from model.classifier import Classifier

    net, meta = load_artifact(SHIPPED)
    Classifier(net, meta, bf16=True, fold_bn=False)
    assert all(p.dtype == torch.float32 for p in net.parameters())  # the caller's network is not converted
    # heatmaps: the fast CAM reads bf16 activations; pytorch-grad-cam's gradients run on an fp32 copy
    for method in ("gradcam", "layercam"):
        h16, h32 = fast.explain(films[0], method=method), shipped.explain(films[0], method=method)
        assert h16.shape == h32.shape and np.corrcoef(h16.ravel(), h32.ravel())[0, 1] > 0.95, method


def test_precision_switch_from_the_environment(monkeypatch):
    monkeypatch.setenv("CXR_BF16", "0")
    assert not model.load_model(SHIPPED).bf16
    monkeypatch.setenv("CXR_BF16", "1")
    assert model.load_model(SHIPPED).bf16


def test_recorded_metrics_follow_from_recorded_scores(report):
    y = np.array([it["y"] for it in report["items"]])
    s = np.array([it["score"] for it in report["items"]])
    for name, m in report["metrics"].items():
        again = threshold_metrics(y, s, m["threshold"])
        assert again["confusion_matrix"] == m["confusion_matrix"], name
        assert again["sensitivity"] == pytest.approx(m["sensitivity"])


def test_validation_quality_as_recorded(report):
    """The figures the README quotes (validation split, patient-grouped)."""
    m = report["metrics"]["default"]
    assert report["auc"]["value"] >= 0.99
    assert m["sensitivity"] >= 0.95 and m["specificity"] >= 0.90


def test_default_heatmap_is_the_most_faithful_measured_for_this_model(shipped):
    """The default CAM follows the ROAD table stored with the shipped model (benchmarks/faithfulness.py
    --record): a retrained model without a fresh table, or a table naming another method, fails here."""
    from model.registry import get_spec

    table = json.loads((SHIPPED / "faithfulness.json").read_text())
    assert table["model"] == shipped.name
    best = max(table["rows"], key=lambda r: r["road_combined_mean"])
    assert table["best"] == {"method": best["method"], "layer": best["layer"]}
    assert best == {**best, "method": model.DEFAULT_CAM_METHOD, "layer": get_spec(shipped.meta.architecture).cam_layer}
    assert len(table["rows"]) >= 6 and table["films"]["n"] >= 60


def test_robustness_benchmark_counts_what_a_user_would_see(shipped, real_images):
    """benchmarks/robustness.py: |dp| and decision flips at the default threshold, checked against a
    'perturbation' that swaps each film for a film of the other class (flips computed independently)."""
    from benchmarks.robustness import MAX_TARGET, measure

    films = [model.decode_image(p) for c in ("NORMAL", "PNEUMONIA") for p in real_images[c]]
    swap = {id(g): films[(i + len(films) // 2) % len(films)] for i, g in enumerate(films)}
    out = measure(shipped, films, {"same": lambda g: g, "other_class": lambda g: swap[id(g)]})
    assert out["same"] == {"mean": 0.0, "max": 0.0, "p95": 0.0, "over_target": 0, "flips": 0, "confident_flips": 0}
    p = shipped.predict_proba(films)
    q = shipped.predict_proba([swap[id(g)] for g in films])
    called = lambda x: x >= shipped.threshold  # noqa: E731
    assert out["other_class"]["flips"] == int((called(p) != called(q)).sum()) > 0
    # a flip with neither probability within the UNCERTAIN band of the threshold
    outside = lambda x: np.abs(x - shipped.threshold) >= DEFAULT_BAND  # noqa: E731
    confident = int(((called(p) != called(q)) & outside(p) & outside(q)).sum())
    assert out["other_class"]["confident_flips"] == confident > 0
    wide = measure(shipped, films, {"other_class": lambda g: swap[id(g)]}, band=1.0)
    assert wide["other_class"]["confident_flips"] == 0  # a band that covers everything leaves no confident call
    assert out["other_class"]["mean"] == pytest.approx(float(np.abs(p - q).mean()), abs=1e-4)
    assert out["other_class"]["over_target"] == int((np.abs(p - q) > MAX_TARGET).sum()) > 0


def test_max_difference_interval_separates_a_real_gap_from_one_film():
    """Paired bootstrap of max(dp) - max(other): a tail higher on many films is a real difference; the same tail
    but for one film's larger value is not (the interval spans 0), though the point difference is as large."""
    from benchmarks.robustness import max_difference

    rng = np.random.default_rng(1)
    base = rng.uniform(0, 0.05, 1000)
    higher = base.copy()
    higher[:40] += 0.06  # forty films move well above the other's maximum
    d, lo, hi = max_difference(higher, base)
    assert d == pytest.approx(higher.max() - base.max()) and 0 < lo <= d <= hi
    one = base.copy()
    one[0] = base.max() + 0.06  # one film alone
    d1, lo1, hi1 = max_difference(one, base)
    assert d1 == pytest.approx(0.06) and lo1 <= 0 < hi1


def test_the_robustness_figures_beside_the_weights_are_these_weights(shipped, data_dir):
    """assets/model/robustness.json (shown on the Model report page) measured the shipped weights on their whole
    validation split: re-measured on a sample of those films, no re-export moves a film further than the file's max."""
    from benchmarks.robustness import measure
    from model.exports import EXPORTS
    from training.data import read_split
    from ui import model_card as card

    rows, info = card.robustness_table(shipped.meta, SHIPPED)
    assert info["this_model"] and len(rows) == len(EXPORTS)
    stored = json.loads((SHIPPED / card.ROBUSTNESS_FILE).read_text())["models"]["model"]["perturbations"]
    films = read_split(SHIPPED / "split.csv", "val", root=data_dir)
    assert info["n_films"] == len(films)
    sample = [model.decode_image(s.path) for s in films[::40]]
    out = measure(shipped, sample, {k: EXPORTS[k] for k in ("sharpen", "down2_up", "noise_3")})
    for name, figures in out.items():
        assert figures["max"] <= stored[name]["max"] + 1e-4, name
