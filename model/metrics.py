"""Binary-classification metrics from scikit-learn, shared by the evaluate CLI and the report page.

Only what scikit-learn lacks is written here: the bootstrap CI for AUC, expected calibration error,
predictive values at another prevalence, and choosing operating points from the ROC curve.
scikit-learn is imported inside the functions (it costs ~2.5 s), so importing this module on the
prediction path stays cheap.
"""

from __future__ import annotations

import numpy as np


def _arrays(y_true, scores):
    y = np.asarray(y_true, dtype=int)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError("labels and scores must be 1-D arrays of the same length")
    return y, s


def threshold_metrics(y_true, scores, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity, PPV, NPV, F1 and the confusion matrix at one threshold.

    A score >= threshold is called positive. Undefined ratios (no predicted positives, say) are 0.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    y, s = _arrays(y_true, scores)
    pred = (s >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    kw = dict(zero_division=0)
    return {
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(y, pred)),
        "sensitivity": float(recall_score(y, pred, pos_label=1, **kw)),
        "specificity": float(recall_score(y, pred, pos_label=0, **kw)),
        "ppv": float(precision_score(y, pred, pos_label=1, **kw)),
        "npv": float(precision_score(y, pred, pos_label=0, **kw)),
        "f1": float(f1_score(y, pred, pos_label=1, **kw)),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """(PPV, NPV) where the positive class is as common as ``prevalence``, by Bayes' rule.

    Why: a split's own PPV and NPV hold only at its class mix (74% pneumonia for the shipped model's);
    sensitivity and specificity carry over to another mix, the predictive values do not. Undefined ratios
    are 0, as in :func:`threshold_metrics`.
    """
    if not all(0 <= v <= 1 for v in (sensitivity, specificity, prevalence)):
        raise ValueError("sensitivity, specificity and prevalence must be proportions")
    tp, fp = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    tn, fn = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    return (tp / (tp + fp) if tp + fp > 0 else 0.0), (tn / (tn + fn) if tn + fn > 0 else 0.0)


def auc_with_ci(y_true, scores, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """ROC AUC with a percentile bootstrap CI (resampling images, stratified by class); ``n_boot=0``
    skips the bootstrap and gives ``ci95: None`` (a report without an interval, not NaN bounds)."""
    from sklearn.metrics import roc_auc_score

    y, s = _arrays(y_true, scores)
    auc = float(roc_auc_score(y, s))
    if n_boot < 1:
        return {"value": auc, "ci95": None, "n_boot": 0}
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    boots = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        boots[i] = roc_auc_score(y[idx], s[idx])
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"value": auc, "ci95": [float(lo), float(hi)], "n_boot": n_boot}


def reliability(y_true, probs, n_bins: int = 10) -> dict:
    """Equal-width reliability bins and the expected calibration error (count-weighted |acc - conf|)."""
    y, p = _arrays(y_true, probs)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    conf = np.bincount(idx, weights=p, minlength=n_bins)
    frac = np.bincount(idx, weights=y, minlength=n_bins)
    nz = counts > 0
    conf[nz] /= counts[nz]
    frac[nz] /= counts[nz]
    ece = float(np.sum(counts[nz] * np.abs(frac[nz] - conf[nz])) / max(len(p), 1))
    return {
        "edges": edges.tolist(),
        "count": counts.tolist(),
        "mean_predicted": [float(c) if n else None for c, n in zip(conf, counts)],
        "fraction_positive": [float(f) if n else None for f, n in zip(frac, counts)],
        "ece": ece,
    }


def operating_points(y_true, scores, min_sensitivity: float = 0.95) -> dict:
    """Thresholds chosen on a labelled split.

    - ``youden``: maximises sensitivity + specificity.
    - ``high_sensitivity``: the most specific threshold whose sensitivity still reaches ``min_sensitivity``.
    - ``screening``: the same with a safety margin of two binomial standard errors of a sensitivity
      estimated from this split's positives, so that ``min_sensitivity`` is likely to hold on new
      data rather than just on the split it was chosen on.
    """
    from sklearn.metrics import roc_curve

    y, s = _arrays(y_true, scores)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    thr = np.minimum(thr, 1.0)  # roc_curve puts +inf first

    def most_specific(target: float) -> float:
        ok = np.flatnonzero(tpr >= min(target, 1.0))
        return float(thr[ok[0]]) if len(ok) else float(thr[-1])

    n_pos = int(y.sum())
    margin = 2.0 * np.sqrt(min_sensitivity * (1 - min_sensitivity) / max(n_pos, 1))
    return {
        "youden": float(thr[int(np.argmax(tpr - fpr))]),
        "high_sensitivity": most_specific(min_sensitivity),
        "screening": most_specific(min_sensitivity + margin),
    }


def summary(y_true, scores, threshold: float) -> dict:
    """Everything the report stores for one set of scores at one threshold."""
    from sklearn.metrics import brier_score_loss

    y, s = _arrays(y_true, scores)
    out = threshold_metrics(y, s, threshold)
    out["brier"] = float(brier_score_loss(y, s))
    out["ece"] = reliability(y, s)["ece"]
    return out
