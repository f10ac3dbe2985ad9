"""Hostile evaluation reports: every malformed file gives a ReportError with a message, never another exception."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

import model
from model import artifact
from model.report import MAX_REPORT_BYTES, EvaluationReport, ReportError, escape_markdown, validate_report


def good_report() -> dict:
    ys = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.3, 0.6, 0.4, 0.8, 0.95]
    return {
        "format_version": 1,
        "model": {"name": "m", "architecture": "resnet18", "weights_sha256": "ab" * 32},
        "data": {"source": "val", "split": "val", "n": 6, "n_positive": 3, "n_negative": 3, "skipped": []},
        "threshold": 0.5,
        "operating_points": {"youden": 0.4},
        "auc": {"value": 0.78, "ci95": [0.5, 1.0], "n_boot": 50},
        "metrics": {},
        "calibration": {},
        "items": [{"file": f"{i}.jpeg", "label": ["NORMAL", "PNEUMONIA"][y], "y": y, "score": s, "score_uncalibrated": s}
                  for i, (y, s) in enumerate(zip(ys, scores))],
    }


def mutate(fn):
    d = good_report()
    fn(d)
    return json.dumps(d).encode()


def item0(key, value):
    return mutate(lambda d: d["items"][0].__setitem__(key, value))


# (raw bytes, a fragment of the expected message)
MALFORMED = {
    "not JSON": (b"{oops", "Not a JSON report"),
    "invalid UTF-8": (b'{"items": "\xff\xfe"}', "Not a JSON report"),
    "top-level list": (b"[]", "not a JSON object"),
    "top-level string": (b'"report"', "not a JSON object"),
    "top-level null": (b"null", "not a JSON object"),
    "nested 100,000 deep (list)": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "nested 100,000 deep (object)": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    "no items": (mutate(lambda d: d.pop("items")), "no 'items'"),
    "items an object": (mutate(lambda d: d.__setitem__("items", {"a": 1})), "'items' must be a list"),
    "items empty": (mutate(lambda d: d.__setitem__("items", [])), "no items"),
    "item a number": (mutate(lambda d: d["items"].__setitem__(0, 7)), "items[0] must be an object"),
    "item without score": (mutate(lambda d: d["items"][0].pop("score")), "has no 'score'"),
    "item without y": (mutate(lambda d: d["items"][2].pop("y")), "items[2] has no 'y'"),
    "item without file": (mutate(lambda d: d["items"][0].pop("file")), "has no 'file'"),
    "label y a string": (item0("y", "1"), "items[0].y must be 0"),
    "label y out of range": (item0("y", 2), "items[0].y must be 0"),
    "label y negative": (item0("y", -1), "items[0].y must be 0"),
    "label y a boolean": (item0("y", True), "items[0].y must be 0"),
    "label y fractional": (item0("y", 0.5), "items[0].y must be 0"),
    "score NaN": (item0("score", float("nan")), "finite"),
    "score Infinity": (item0("score", float("inf")), "finite"),
    "score -Infinity": (item0("score", float("-inf")), "finite"),
    "score a string": (item0("score", "0.5"), "items[0].score must be a number"),
    "score null": (item0("score", None), "items[0].score must be a number"),
    "score out of range": (item0("score", 1.5), "between 0 and 1"),
    "score_uncalibrated a string": (item0("score_uncalibrated", "x"), "score_uncalibrated must be a number"),
    "file a number": (item0("file", 12), "items[0].file must be a string"),
    "label a list": (item0("label", ["x"]), "items[0].label must be a string"),
    "one class only": (mutate(lambda d: [it.__setitem__("y", 1) for it in d["items"]]), "both classes"),
    "no auc": (mutate(lambda d: d.pop("auc")), "no 'auc'"),
    "auc a string": (mutate(lambda d: d.__setitem__("auc", "0.9")), "'auc' must be an object"),
    "auc a number": (mutate(lambda d: d.__setitem__("auc", 0.9)), "'auc' must be an object"),
    "auc without value": (mutate(lambda d: d["auc"].pop("value")), "'auc' has no 'value'"),
    "auc value a string": (mutate(lambda d: d["auc"].__setitem__("value", "0.9")), "auc.value must be a number"),
    "auc value NaN": (mutate(lambda d: d["auc"].__setitem__("value", float("nan"))), "finite"),
    "ci95 strings": (mutate(lambda d: d["auc"].__setitem__("ci95", ["a", "b"])), "auc.ci95 must be a number"),
    "ci95 a number": (mutate(lambda d: d["auc"].__setitem__("ci95", 0.9)), "list of two numbers"),
    "ci95 three numbers": (mutate(lambda d: d["auc"].__setitem__("ci95", [0.1, 0.2, 0.3])), "list of two numbers"),
    "ci95 reversed": (mutate(lambda d: d["auc"].__setitem__("ci95", [0.9, 0.1])), "[low, high]"),
    "ci95 with inf": (mutate(lambda d: d["auc"].__setitem__("ci95", [0.1, float("inf")])), "finite"),
    "data a string": (mutate(lambda d: d.__setitem__("data", "val")), "'data' must be an object"),
    "data a list": (mutate(lambda d: d.__setitem__("data", [1])), "'data' must be an object"),
    "split a list": (mutate(lambda d: d["data"].__setitem__("split", ["val"])), "data.split must be a string"),
    "model a string": (mutate(lambda d: d.__setitem__("model", "m")), "'model' must be an object"),
    "model name an object": (mutate(lambda d: d["model"].__setitem__("name", {"x": 1})), "model.name must be a string"),
    "model name huge": (mutate(lambda d: d["model"].__setitem__("name", "x" * 5000)), "model.name is too long"),
    "metrics a list": (mutate(lambda d: d.__setitem__("metrics", [])), "'metrics' must be an object"),
    "threshold a string": (mutate(lambda d: d.__setitem__("threshold", "high")), "threshold must be a number"),
    "operating point NaN": (mutate(lambda d: d["operating_points"].__setitem__("x", float("nan"))), "finite"),
    "format_version 2": (mutate(lambda d: d.__setitem__("format_version", 2)), "format_version"),
}


def test_the_good_report_loads_and_computes():
    r = EvaluationReport.from_bytes(json.dumps(good_report()).encode())
    assert r.n == 6 and r.auc == 0.78 and r.auc_ci == (0.5, 1.0) and r.split == "val" and r.model_name == "m"
    assert r.at(0.5)["confusion_matrix"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 2}
    assert len(r.roc["fpr"]) > 2 and np.isfinite(r.reliability_calibrated["ece"])
    # optional parts may be absent (older or hand-made reports)
    minimal = {"items": good_report()["items"], "auc": {"value": 0.7}}
    r = EvaluationReport(minimal)
    assert r.auc_ci is None and r.split == "?" and r.model_name == "?"


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_report_gives_a_clear_report_error(name, tmp_path):
    raw, fragment = MALFORMED[name]
    with pytest.raises(ReportError, match=None) as info:
        EvaluationReport.from_bytes(raw)
    assert fragment in str(info.value), str(info.value)
    path = tmp_path / "report.json"
    path.write_bytes(raw)
    with pytest.raises(ReportError):
        EvaluationReport.from_path(path)


def test_at_least_the_issues_17_cases_are_covered():
    assert len(MALFORMED) >= 17


def test_validate_report_is_the_one_gate():
    d = good_report()
    assert validate_report(d) is d
    d["items"][3]["score"] = float("nan")
    with pytest.raises(ReportError):
        EvaluationReport(d)  # the constructor validates too: a dict from anywhere goes through the same schema


def test_size_bound(monkeypatch, tmp_path):
    monkeypatch.setattr("model.report.MAX_REPORT_BYTES", 500)
    raw = json.dumps(good_report()).encode()
    assert len(raw) > 500
    with pytest.raises(ReportError, match="at most"):
        EvaluationReport.from_bytes(raw)
    (tmp_path / "r.json").write_bytes(raw)
    with pytest.raises(ReportError, match="at most"):
        EvaluationReport.from_path(tmp_path / "r.json")
    assert MAX_REPORT_BYTES >= 16 * 2**20  # real reports (one row per image) fit easily


def test_missing_file_is_a_report_error(tmp_path):
    with pytest.raises(ReportError, match="Could not read"):
        EvaluationReport.from_path(tmp_path / "nope.json")


def test_bad_report_json_in_a_model_directory(tmp_path):
    """Companion files are read with the same care: deep nesting or bad bytes -> ModelArtifactError."""
    (tmp_path / "report.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(model.ModelArtifactError, match="nested too deeply"):
        artifact.read_json(tmp_path, "report.json")
    (tmp_path / "report.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(model.ModelArtifactError, match="not valid JSON"):
        artifact.read_json(tmp_path, "report.json")
    (tmp_path / "report.json").write_text(json.dumps({**good_report(), "auc": "0.9"}))
    with pytest.raises(ReportError, match="'auc' must be an object"):
        EvaluationReport(artifact.read_json(tmp_path, "report.json"))


def test_escape_markdown_neutralises_links_images_and_html():
    hostile = "![p](https://attacker.example/p.png) [x](http://a.example) <img src=x> **b** :material/home: $x$"
    out = escape_markdown(hostile)
    assert re.search(r"(?<!\\)[\[\]()!<>*$:]", out) is None  # every special character is escaped
    assert "\\!\\[p\\]\\(https\\://attacker.example/p.png\\)" in out
    assert escape_markdown("my-hospital val_2") == "my-hospital val\\_2"
    # unescaping gives back the original text: nothing is lost, only made literal
    assert out.replace("\\", "") == hostile


def test_good_report_copy_is_not_mutated_by_validation():
    d = good_report()
    before = copy.deepcopy(d)
    EvaluationReport(d)
    assert d == before


def test_report_without_bootstrap_is_valid_and_shown_without_an_interval():
    """`training.evaluate --n-boot 0` writes ci95 null (it used to write NaN bounds that its own validator refused)."""
    from model.metrics import auc_with_ci
    from training.evaluate import format_report

    d = good_report()
    ys, scores = [it["y"] for it in d["items"]], [it["score"] for it in d["items"]]
    d["auc"] = auc_with_ci(ys, scores, n_boot=0)
    assert d["auc"]["ci95"] is None and d["auc"]["value"] == pytest.approx(8 / 9)
    report = EvaluationReport.from_bytes(json.dumps(d).encode())
    assert report.auc_ci is None
    d["calibration"] = {"uncalibrated": {"ece": 0.1}, "calibrated": {"ece": 0.05}, "temperature": 1.0}
    assert "no CI: --n-boot 0" in format_report(d)


def test_summary_at_holds_the_page_figures_and_only_validated_fields():
    r = EvaluationReport(good_report())
    s = r.summary_at(0.5, prevalence=0.1)
    # threshold 0.5 on the six films: TP 2 (0.8, 0.95), FN 1 (0.4), TN 2 (0.1, 0.3), FP 1 (0.6)
    assert s["at_threshold"]["confusion_matrix"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 2}
    assert s["at_threshold"] == r.at(0.5)
    sens = spec = 2 / 3  # at 10% prevalence: PPV = 0.1 * 2/3 / (0.1 * 2/3 + 0.9 * 1/3)
    assert s["at_prevalence"] == {"prevalence": 0.1, "ppv": pytest.approx(0.1 * sens / (0.1 * sens + 0.9 * (1 - spec))),
                                  "npv": pytest.approx(0.9 * spec / (0.9 * spec + 0.1 * (1 - sens)))}
    assert (s["model"], s["split"], s["n"], s["n_pneumonia"]) == ("m", "val", 6, 3)
    assert s["auc"] == {"value": 0.78, "ci95": [0.5, 1.0]} and s["weights_sha256"] == "ab" * 32
    assert json.loads(json.dumps(s, allow_nan=False)) == s  # plain JSON: the page's download
    assert "not a medical device" in s["note"]
    assert "at_prevalence" not in r.summary_at(0.5)
    for hostile in ("<img src=x>", {"a": 1}, "AB" * 32, 7):  # not echoed into the download
        d = good_report()
        d["model"]["weights_sha256"] = hostile
        assert EvaluationReport(d).summary_at(0.5)["weights_sha256"] is None


def test_metrics_at_a_threshold_are_memoised_as_copies():
    from model.metrics import threshold_metrics

    r = EvaluationReport(good_report())
    first = r.at(0.5)
    first["f1"], first["confusion_matrix"]["tp"] = 9.0, -1  # a caller scribbling on its figures
    assert r.at(0.5) == threshold_metrics(r.y, r.scores, 0.5)
    assert r.at(0.7) != r.at(0.5) and len(r._at) == 2
