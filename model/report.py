"""An evaluation report (as written by ``training.evaluate``) with its curves computed once.

Like scikit-learn's ``RocCurveDisplay.from_predictions``: the scores are stored, the curves and
threshold-dependent metrics are derived from them on demand (so moving a threshold slider costs a
vectorised comparison, not a re-evaluation of the model).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from .metrics import reliability, threshold_metrics

from .decision import DECISIONS, decide  # noqa: F401  (re-exported: older callers import them from here)


class ReportError(ValueError):
    """The file is not a usable evaluation report."""


class EvaluationReport:
    def __init__(self, data: dict):
        try:
            items = data["items"]
            self.y = np.array([it["y"] for it in items], dtype=int)
            self.scores = np.array([it["score"] for it in items], dtype=float)
            self.scores_uncalibrated = np.array([it.get("score_uncalibrated", it["score"]) for it in items], dtype=float)
            self.files = [it["file"] for it in items]
        except (KeyError, TypeError) as err:
            raise ReportError(f"Not an evaluation report (missing {err}).") from None
        if len(self.y) == 0 or len(set(self.y.tolist())) < 2:
            raise ReportError("The report needs scores for both classes.")
        self.data = data

    @classmethod
    def from_path(cls, path: str | Path) -> "EvaluationReport":
        try:
            return cls(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ReportError(f"Could not read {path}: {err}") from None

    @classmethod
    def from_bytes(cls, data: bytes) -> "EvaluationReport":
        try:
            return cls(json.loads(data))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReportError(f"Not a JSON report: {err}") from None

    # ---- stored facts -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def auc(self) -> float:
        return float(self.data["auc"]["value"])

    @property
    def auc_ci(self) -> tuple[float, float] | None:
        ci = self.data.get("auc", {}).get("ci95")
        return tuple(ci) if ci else None

    @property
    def split(self) -> str:
        return str(self.data.get("data", {}).get("split", "?"))

    @property
    def model_name(self) -> str:
        return str(self.data.get("model", {}).get("name", "?"))

    # ---- derived once ---------------------------------------------------------------------------
    @cached_property
    def roc(self) -> dict:
        from sklearn.metrics import roc_curve  # scikit-learn costs ~2.5 s to import: not at start-up

        fpr, tpr, thr = roc_curve(self.y, self.scores)
        return {"fpr": fpr, "tpr": tpr, "thresholds": np.minimum(thr, 1.0)}

    @cached_property
    def pr(self) -> dict:
        from sklearn.metrics import precision_recall_curve

        precision, recall, thr = precision_recall_curve(self.y, self.scores)
        return {"precision": precision, "recall": recall, "thresholds": thr}

    @cached_property
    def reliability_calibrated(self) -> dict:
        return reliability(self.y, self.scores)

    @cached_property
    def reliability_uncalibrated(self) -> dict:
        return reliability(self.y, self.scores_uncalibrated)

    def at(self, threshold: float) -> dict:
        """Accuracy, sensitivity, specificity, PPV, NPV, F1 and confusion matrix at ``threshold``."""
        return threshold_metrics(self.y, self.scores, threshold)
