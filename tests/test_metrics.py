"""Metrics match scikit-learn on known cases; operating points and calibration behave as documented."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

from model.metrics import auc_with_ci, operating_points, reliability, threshold_metrics
from model.report import EvaluationReport, decide


def test_known_confusion_matrix():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7, 0.55, 0.2])
    m = threshold_metrics(y, s, 0.5)
    assert m["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 2, "tp": 4}
    assert m["sensitivity"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["ppv"] == pytest.approx(4 / 5)
    assert m["npv"] == pytest.approx(3 / 5)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["f1"] == pytest.approx(f1_score(y, s >= 0.5))


def test_random_cases_agree_with_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.clip(y * 0.3 + rng.random(500) * 0.7, 0, 1)
    for t in (0.2, 0.5, 0.8):
        m, pred = threshold_metrics(y, s, t), (s >= t).astype(int)
        assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
        assert m["ppv"] == pytest.approx(precision_score(y, pred))
        tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
        assert m["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}


def test_auc_ci_contains_auc_and_is_seeded():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = y * 0.4 + rng.random(300)
    a, b = auc_with_ci(y, s, n_boot=200, seed=3), auc_with_ci(y, s, n_boot=200, seed=3)
    assert a == b and a["value"] == pytest.approx(roc_auc_score(y, s))
    assert a["ci95"][0] < a["value"] < a["ci95"][1]


def test_operating_points():
    y = np.array([0] * 100 + [1] * 400)
    s = np.concatenate([np.linspace(0, 0.6, 100), np.linspace(0.4, 1, 400)])
    pts = operating_points(y, s, min_sensitivity=0.95)
    assert threshold_metrics(y, s, pts["high_sensitivity"])["sensitivity"] >= 0.95
    # it is the most specific threshold that still reaches the target
    assert threshold_metrics(y, s, pts["high_sensitivity"] + 1e-9)["sensitivity"] < 0.95
    # the screening point keeps a margin: sensitivity >= 0.95 + 2 SE with 400 positives (= 0.95 + 0.0218)
    target = 0.95 + 2 * np.sqrt(0.95 * 0.05 / 400)
    assert threshold_metrics(y, s, pts["screening"])["sensitivity"] >= target
    assert threshold_metrics(y, s, pts["screening"] + 1e-9)["sensitivity"] < target
    assert pts["screening"] < pts["high_sensitivity"]
    j = lambda t: sum(threshold_metrics(y, s, t)[k] for k in ("sensitivity", "specificity"))  # noqa: E731
    assert j(pts["youden"]) >= max(j(t) for t in np.linspace(0, 1, 101)) - 1e-9


def test_ece_known_values():
    y = np.array([1, 1, 0, 0])
    assert reliability(y, np.array([1.0, 1.0, 0.0, 0.0]))["ece"] == pytest.approx(0.0)
    assert reliability(y, np.array([0.5, 0.5, 0.5, 0.5]))["ece"] == pytest.approx(0.0)  # one bin: 50% vs 0.5
    assert reliability(y, np.array([0.0, 0.0, 1.0, 1.0]))["ece"] == pytest.approx(1.0)


def test_decide_band():
    assert decide(0.7, 0.5) == "PNEUMONIA" and decide(0.3, 0.5) == "NORMAL" and decide(0.5, 0.5) == "PNEUMONIA"
    assert decide(0.55, 0.5, band=0.1) == "UNCERTAIN" and decide(0.65, 0.5, band=0.1) == "PNEUMONIA"


def test_report_curves_and_threshold():
    y = [0, 0, 1, 1]
    items = [{"file": f"{i}", "y": t, "score": s} for i, (t, s) in enumerate(zip(y, [0.1, 0.6, 0.4, 0.9]))]
    r = EvaluationReport({"items": items, "auc": {"value": 0.75}})
    assert r.at(0.5)["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 1}
    assert r.at(0.3)["confusion_matrix"]["tp"] == 2
    assert r.roc["tpr"][-1] == 1.0 and r.auc == 0.75


def test_at_prevalence_is_bayes_on_a_known_population():
    """Scores x ~ N(+1, 1) for positives and N(-1, 1) for negatives: at prevalence pi the true P(positive | x) is
    sigmoid(2x + logit pi), so moving a calibrated probability from pi to pi' must give sigmoid(2x + logit pi')."""
    from model.decision import at_prevalence

    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for x in np.linspace(-3, 3, 13):
        for pi, pi2 in ((0.74, 0.10), (0.74, 0.74), (0.3, 0.9)):
            assert at_prevalence(sig(2 * x + logit(pi)), pi, pi2) == pytest.approx(sig(2 * x + logit(pi2)), rel=1e-9)
    assert at_prevalence(0.0, 0.74, 0.1) == 0.0 and at_prevalence(1.0, 0.74, 0.1) == 1.0
    for bad in ((0.5, 0.0, 0.1), (0.5, 0.74, 1.0), (1.2, 0.74, 0.1), (float("nan"), 0.74, 0.1)):
        with pytest.raises(ValueError):
            at_prevalence(*bad)


def test_predictive_values_equal_sklearn_on_a_population_reweighted_to_that_prevalence():
    """PPV/NPV at prevalence pi are the precisions on the same films with each class reweighted to make up pi."""
    from model.metrics import predictive_values

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    pred = np.where(rng.random(400) < 0.85, y, 1 - y)  # a classifier right 85% of the time
    sens, spec = recall_score(y, pred, pos_label=1), recall_score(y, pred, pos_label=0)
    for pi in (0.02, 0.1, 0.5, 0.74, 0.97):
        w = np.where(y == 1, pi / y.mean(), (1 - pi) / (1 - y.mean()))
        ppv, npv = predictive_values(sens, spec, pi)
        assert ppv == pytest.approx(precision_score(y, pred, pos_label=1, sample_weight=w), rel=1e-9)
        assert npv == pytest.approx(precision_score(y, pred, pos_label=0, sample_weight=w), rel=1e-9)
    assert predictive_values(0.0, 1.0, 0.3) == (0.0, 0.7)  # nothing called positive: PPV undefined -> 0
    with pytest.raises(ValueError):
        predictive_values(0.9, 1.2, 0.1)
