"""An evaluation report (as written by ``training.evaluate``) with its curves computed once.

Like scikit-learn's ``RocCurveDisplay.from_predictions``: the scores are stored, the curves and
threshold-dependent metrics are derived from them on demand (so moving a threshold slider costs a
vectorised comparison, not a re-evaluation of the model).
"""

from __future__ import annotations

import json
import math
import re
from functools import cached_property
from pathlib import Path

import numpy as np

from .metrics import predictive_values, reliability, threshold_metrics

from .decision import DECISIONS, DISCLAIMER, decide  # noqa: F401  (DECISIONS, decide: re-exported for older callers)


MAX_REPORT_BYTES = 64 * 1024 * 1024  # ~100x a 5,000-image report; larger files are refused unread
MAX_ITEMS = 1_000_000
REPORT_VERSION = 1
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!<>|~$:&])")


class ReportError(ValueError):
    """The file is not a usable evaluation report."""


def escape_markdown(text: object) -> str:
    """Report-derived text as plain text inside Streamlit markdown: no links, images, HTML, emphasis,
    emoji/icon shortcodes or LaTeX (every character that could start one is backslash-escaped)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def _number(value, where: str, lo: float = 0.0, hi: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{where} must be a number, found {_kind(value)} ({str(value)[:40]!r}).")
    value = float(value)
    if not math.isfinite(value):
        raise ReportError(f"{where} must be a finite number, found {value}.")
    if not lo <= value <= hi:
        raise ReportError(f"{where} must be between {lo:g} and {hi:g}, found {value:g}.")
    return value


def _object(value, where: str, required: bool = False) -> dict:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ReportError(f"{where} must be an object, found {_kind(value)}.")
    return value


def _text(value, where: str, required: bool = False, max_len: int = 1000) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ReportError(f"{where} must be a string, found {_kind(value)}.")
    if len(value) > max_len:
        raise ReportError(f"{where} is too long ({len(value)} characters; at most {max_len}).")
    return value


def validate_report(data) -> dict:
    """Check a decoded report against the schema written by ``training.evaluate`` (the one place that does).

    Raises ``ReportError`` naming the first offending field; returns ``data`` unchanged when it is usable.
    Required: ``items`` (a non-empty list of {file: str, y: 0/1, score: number in [0, 1]
    [, score_uncalibrated: number in [0, 1], label: str]}, both classes present) and ``auc.value`` (number
    in [0, 1]). Optional but checked when present: ``auc.ci95`` (two numbers lo <= hi in [0, 1]), ``model``,
    ``data``, ``metrics``, ``calibration`` (objects), ``model.name``, ``data.split`` (strings),
    ``threshold`` and ``operating_points`` (numbers in [0, 1]), ``format_version`` (1).
    """
    if not isinstance(data, dict):
        raise ReportError(f"Not an evaluation report: the file holds {_kind(data)}, not a JSON object.")
    version = data.get("format_version", REPORT_VERSION)
    if version != REPORT_VERSION or isinstance(version, bool):
        raise ReportError(f"format_version {str(version)[:20]!r} is not supported (this code reads {REPORT_VERSION}).")
    items = data.get("items")
    if items is None:
        raise ReportError("Not an evaluation report: no 'items' (one row per scored image).")
    if not isinstance(items, list):
        raise ReportError(f"'items' must be a list, found {_kind(items)}.")
    if not items:
        raise ReportError("The report has no items (no scored images).")
    if len(items) > MAX_ITEMS:
        raise ReportError(f"The report has {len(items)} items; at most {MAX_ITEMS} are supported.")
    for i, it in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(it, dict):
            raise ReportError(f"{where} must be an object, found {_kind(it)}.")
        for key in ("file", "y", "score"):
            if key not in it:
                raise ReportError(f"Not an evaluation report: {where} has no '{key}'.")
        _text(it["file"], f"{where}.file", required=True)
        _text(it.get("label"), f"{where}.label")
        y = it["y"]
        if isinstance(y, bool) or not isinstance(y, int) or y not in (0, 1):
            raise ReportError(f"{where}.y must be 0 (normal) or 1 (pneumonia), found {str(y)[:40]!r}.")
        _number(it["score"], f"{where}.score")
        if "score_uncalibrated" in it:
            _number(it["score_uncalibrated"], f"{where}.score_uncalibrated")
    if len({it["y"] for it in items}) < 2:
        raise ReportError("The report needs scores for both classes.")
    if "auc" not in data:
        raise ReportError("Not an evaluation report: no 'auc'.")
    auc = _object(data["auc"], "'auc'", required=True)
    if "value" not in auc:
        raise ReportError("Not an evaluation report: 'auc' has no 'value'.")
    _number(auc["value"], "auc.value")
    ci = auc.get("ci95")
    if ci is not None:
        if not isinstance(ci, list) or len(ci) != 2:
            raise ReportError(f"auc.ci95 must be a list of two numbers, found {_kind(ci)}.")
        lo, hi = (_number(v, "auc.ci95") for v in ci)
        if lo > hi:
            raise ReportError(f"auc.ci95 must be [low, high], found [{lo:g}, {hi:g}].")
    for key in ("model", "data", "metrics", "calibration"):
        _object(data.get(key), f"'{key}'")
    _text((data.get("model") or {}).get("name"), "model.name", max_len=200)
    _text((data.get("data") or {}).get("split"), "data.split", max_len=200)
    _text((data.get("data") or {}).get("source"), "data.source", max_len=4000)
    if data.get("threshold") is not None:
        _number(data["threshold"], "threshold")
    for k, v in _object(data.get("operating_points"), "'operating_points'").items():
        _number(v, f"operating_points.{k}")
    return data


def _loads(raw: bytes | str) -> object:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"Not a JSON report: {err}") from None
    except RecursionError:
        raise ReportError("Not a usable report: the JSON is nested too deeply.") from None


class EvaluationReport:
    def __init__(self, data: dict):
        validate_report(data)
        items = data["items"]
        self.y = np.array([it["y"] for it in items], dtype=int)
        self.scores = np.array([it["score"] for it in items], dtype=float)
        self.scores_uncalibrated = np.array([it.get("score_uncalibrated", it["score"]) for it in items], dtype=float)
        self.files = [it["file"] for it in items]
        self.data = data
        self._at: dict[float, dict] = {}

    @classmethod
    def from_path(cls, path: str | Path) -> "EvaluationReport":
        path = Path(path)
        try:
            size = path.stat().st_size
            if size > MAX_REPORT_BYTES:
                raise ReportError(f"{path.name} is {size / 2**20:.0f} MB; a report may be at most "
                                  f"{MAX_REPORT_BYTES // 2**20} MB.")
            raw = path.read_bytes()
        except OSError as err:
            raise ReportError(f"Could not read {path.name}: {err.strerror or err}") from None
        return cls(_loads(raw))

    @classmethod
    def from_bytes(cls, data: bytes) -> "EvaluationReport":
        if len(data) > MAX_REPORT_BYTES:
            raise ReportError(f"The file is {len(data) / 2**20:.0f} MB; a report may be at most "
                              f"{MAX_REPORT_BYTES // 2**20} MB.")
        return cls(_loads(data))

    # ---- stored facts -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def auc(self) -> float:
        return float(self.data["auc"]["value"])

    @property
    def auc_ci(self) -> tuple[float, float] | None:
        ci = self.data["auc"].get("ci95")
        return (float(ci[0]), float(ci[1])) if ci else None

    @property
    def split(self) -> str:
        return (self.data.get("data") or {}).get("split") or "?"

    @property
    def model_name(self) -> str:
        return (self.data.get("model") or {}).get("name") or "?"

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
        """Accuracy, sensitivity, specificity, PPV, NPV, F1 and confusion matrix at ``threshold``.

        Memoised per threshold: one rerun of the report page asks for the same threshold's metrics from the
        sidebar, the tiles, two charts and the download (~14 ms of scikit-learn each on 1034 films). A copy is
        returned, so no caller can change another's figures; the memo is bounded (the report is shared by sessions).
        """
        key = float(threshold)
        m = self._at.get(key)
        if m is None:
            if len(self._at) >= 4096:
                self._at.clear()
            m = self._at[key] = threshold_metrics(self.y, self.scores, key)
        return {**m, "confusion_matrix": dict(m["confusion_matrix"])}

    def summary_at(self, threshold: float, prevalence: float | None = None) -> dict:
        """The report page's figures at ``threshold`` as one JSON-ready record (its download): which model and
        split they were measured on, AUC, the threshold's metrics, and PPV/NPV moved to ``prevalence``.

        Only validated fields are echoed, so a loaded report cannot put arbitrary content into the download.
        """
        m = self.at(threshold)
        sha = (self.data.get("model") or {}).get("weights_sha256")
        out = {
            "model": self.model_name,
            "weights_sha256": sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None,
            "split": self.split,
            "n": self.n,
            "n_pneumonia": int(self.y.sum()),
            "auc": {"value": self.auc, "ci95": list(self.auc_ci) if self.auc_ci else None},
            "at_threshold": m,
            "note": f"As measured on this split; other data may differ. {DISCLAIMER}",
        }
        if prevalence is not None:
            ppv, npv = predictive_values(m["sensitivity"], m["specificity"], prevalence)
            out["at_prevalence"] = {"prevalence": float(prevalence), "ppv": ppv, "npv": npv}
        return out
