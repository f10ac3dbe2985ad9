"""What the Model report page says about a model, from the artifact's own metadata and the report loaded.

Pure functions (no Streamlit), so each sentence can be tested against odd artifacts: a model trained on
someone's CSV must not be described as the Guangzhou data set, and a report of the official 16-image
``val`` folder is not the validation split carved from training.

Strings from ``model.json`` or a report are data, never markup: :func:`md_escape` them before they
reach ``st.markdown``, or show them with ``st.text`` / in a dataframe.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import PurePath
from typing import Any

KERMANY_CREDIT = (
    "pediatric chest X-rays of Kermany et al., *Cell* 2018 (CC BY 4.0): Guangzhou Women and Children's Medical Center, "
    "children aged 1-5, anterior-posterior films"
)
_KERMANY_WORDS = re.compile(r"kermany|guangzhou", re.I)
FAITHFULNESS_FILE = "faithfulness.json"
INDEPENDENT_FILE = "independent.json"
ROBUSTNESS_FILE = "robustness.json"
_INDEPENDENT_METRICS = ("threshold", "auc", "accuracy", "sensitivity", "specificity", "ece", "tn", "fp", "fn", "tp")


def md_escape(value: Any) -> str:
    """Plain text for st.markdown (one escaping rule for the whole app: model.report.escape_markdown)."""
    from model.report import escape_markdown

    return escape_markdown(value)


# ---- training data ----------------------------------------------------------------------------------

def is_kermany(training: dict) -> bool:
    """The shipped data set (Kermany et al.): said so in the description, or trained on a ``chest_xray`` folder."""
    desc = str(training.get("data_description") or "")
    data = str(training.get("data") or "")
    return bool(_KERMANY_WORDS.search(desc)) or (bool(data) and PurePath(data.rstrip("/\\")).name == "chest_xray")


def data_line(training: dict) -> str:
    """The model card's **Data** item (markdown, metadata escaped)."""
    counts = []
    if training.get("train_images") is not None:
        counts.append(f"{md_escape(training['train_images'])} training")
    if training.get("val_images") is not None:
        counts.append(f"{md_escape(training['val_images'])} validation")
    count_txt = (" and ".join(counts) + " images" + (", split by patient" if training.get("val_patients") else "")) if counts else ""
    desc = str(training.get("data_description") or "").strip()
    data = str(training.get("data") or "").strip()
    if desc:
        text = md_escape(desc)
        if is_kermany(training) and not _KERMANY_WORDS.search(desc):
            text += f" ({KERMANY_CREDIT})"
    elif is_kermany(training):
        text = KERMANY_CREDIT
    elif data:
        text = (f"the images in {md_escape(data)}; the training run recorded no description of them, so their source, "
                "population and projections are not stated here")
    else:
        text = "not recorded in this model's metadata"
    return f"**Data**: {text}" + (f"; {count_txt}." if count_txt else ".")


def scope_sentence(training: dict | None) -> str:
    """What the model was trained on, for the disclaimer (markdown, metadata escaped)."""
    desc = str((training or {}).get("data_description") or "").strip()
    if not desc:
        return "Results on populations other than the model's training data are unknown."
    return f"Trained on: {md_escape(desc[:300])}. Results on other populations are unknown."


def limitations_line(training: dict) -> str:
    if is_kermany(training):
        scope = ("one centre, one age band, one projection; adult films, lateral views, other devices and other "
                 "diseases are outside what it has seen. It does not distinguish bacterial from viral pneumonia.")
    else:
        scope = ("it has seen only its training data (above): other populations, devices, projections and diseases "
                 "are outside what it was measured on.")
    return f"**Limitations**: {scope} The heatmaps show where the model looked, not where disease is."


def model_line(name: str, meta) -> str:
    training = meta.training or {}
    pretrained = training.get("pretrained")
    how = {True: "fine-tuned from pretrained weights", False: "trained from scratch (no pretrained weights)"}.get(pretrained, "")
    sigma, band = getattr(meta, "equalize_sigma", 0.0), getattr(meta, "band_limit", None)
    steps = [t for t, on in (("histogram-equalised" + (f" (mapping from a {sigma:g} px smoothed copy)" if sigma else ""),
                              getattr(meta, "equalize", False)),
                             ("spectrum-matched to its training films", getattr(meta, "spectrum", None)),
                             (f"low-passed (Gaussian, sigma {band:g} x Nyquist)" if band else "", band)) if on]
    return (f"**Model**: {md_escape(name)}: {md_escape(meta.architecture)}{' ' + how if how else ''}, "
            f"{md_escape(meta.input_size)} x {md_escape(meta.input_size)} grayscale input, {md_escape(meta.resize)}"
            f"{', ' + ' and '.join([', '.join(steps[:-1]), steps[-1]] if len(steps) > 2 else steps) if steps else ''}. "
            f"Weights sha256 {md_escape(meta.weights_sha256[:16])}...")


# ---- operating points ------------------------------------------------------------------------------

def operating_points(meta) -> dict[str, float]:
    """``default`` plus the named points, each threshold once: a point equal to the default (the
    training CLI stores the default again under its rule's name, e.g. ``screening``) is folded into
    the default's label instead of being listed twice."""
    default = float(meta.threshold)
    aliases = [k for k, v in (meta.operating_points or {}).items() if _same(v, default)]
    out = {"default" + (f" ({', '.join(aliases)})" if aliases else ""): default}
    for k, v in (meta.operating_points or {}).items():
        if k not in aliases and not any(_same(v, w) for w in out.values()):
            out[k] = float(v)
    return out


def _same(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    except (TypeError, ValueError):
        return False


# ---- which split a report measures -------------------------------------------------------------------

def is_carved_validation(report) -> bool:
    """Is this report the patient-grouped validation split carved from the training folder?

    ``training.evaluate`` writes ``data.source`` = the split file (``split.csv``) and ``data.split`` =
    its subset when it scores a carved split; a folder (``--data-dir X --split val``) gives the folder
    and its name. Items under ``train/`` scored as ``val`` are the same thing.
    """
    data = report.data.get("data", {}) if isinstance(report.data.get("data"), dict) else {}
    split = str(data.get("split", "")).lower()
    if split not in ("val", "valid", "validation"):
        return False
    source = str(data.get("source", "")).lower()
    if source.endswith(".csv") and "manifest" not in source:
        return True
    files = [str(f).replace("\\", "/") for f in report.files]
    return bool(files) and all(f.startswith("train/") for f in files)


def split_notice(report) -> str | None:
    """The notice under the report's caption (markdown; split names escaped), or None."""
    if is_carved_validation(report):
        return ("This is the patient-grouped validation split carved from the training folder: the same hospital and "
                "period as the training images, and the split the threshold and calibration were chosen on. "
                "Expect lower figures on data from elsewhere.")
    if report.n < 100:
        return (f"This report scores only {report.n} images ({md_escape(report.split)}): every figure here is very "
                "uncertain (see the AUC's confidence interval). Use a larger labelled set to judge the model.")
    return None


def prevalence_note(meta, elsewhere: float = 0.10, shown: float = 0.85) -> str | None:
    """What a probability means where pneumonia is rarer than in the calibration split (Bayes on the odds)."""
    from model.decision import at_prevalence

    prev = meta.prevalence
    if prev is None:
        return None
    return (f"These probabilities are calibrated on films of which {prev:.0%} show pneumonia. The same film means a "
            f"different chance where pneumonia is more or less common (Bayes' rule on the odds): where {elsewhere:.0%} "
            f"of films show it, a shown {shown:.2f} is about {at_prevalence(shown, prev, elsewhere):.2f}. Sensitivity "
            "and specificity do not depend on how common pneumonia is; PPV and NPV do.")


def predictive_values_sentence(prevalence: float, ppv: float, npv: float, own: float, own_ppv: float, own_npv: float) -> str:
    return (f"At {prevalence:.1%} prevalence this threshold's sensitivity and specificity give **PPV {ppv:.3f}** and "
            f"**NPV {npv:.3f}** (this report's films, {own:.1%} pneumonia: PPV {own_ppv:.3f}, NPV {own_npv:.3f}).")


def calibration_caption(report) -> str:
    if is_carved_validation(report):
        return ("The calibration was fitted on this same validation split, so the 'after' ECE is optimistic.")
    return (f"The calibration was fitted on the model's own validation split; this report scores other images "
            f"({md_escape(report.split)}, {report.n} films), so the 'after' ECE is an independent check"
            + (" - a noisy one with so few films." if report.n < 100 else "."))


# ---- gate and faithfulness figures --------------------------------------------------------------------

def raw_meta(directory) -> dict:
    """model.json as stored: fields the running code's ModelMeta does not know (yet) are kept."""
    from model.artifact import META_FILE, ModelArtifactError, read_json

    try:  # read_json: the artifact's one reader of its JSON files (size cap, deep nesting refused)
        data = read_json(directory, META_FILE) if directory else None
    except (ModelArtifactError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def gate_figures(meta, directory=None) -> dict | None:
    gate = getattr(meta, "gate", None) or raw_meta(directory).get("gate")
    return gate if isinstance(gate, dict) and gate else None


def gate_summary(gate: dict) -> str:
    """One sentence (markdown, values escaped) from whatever the gate's figures hold."""
    parts = ["The input gate refuses images unlike the training films (other body parts, other modalities, photos, "
             "lateral views) before the model's answer is shown"]
    if gate.get("method") is not None:
        parts.append(f"; method: {md_escape(gate['method'])}")
    if isinstance(gate.get("threshold"), (int, float)):
        parts.append(f", flagging scores above {gate['threshold']:.4g}")
    sentence = "".join(parts) + "."
    if isinstance(gate.get("val_flag_rate"), (int, float)):
        sentence += f" It flags {gate['val_flag_rate']:.1%} of the validation films."
    adult = (gate.get("ood_eval") or {}).get("adult_chest") if isinstance(gate.get("ood_eval"), dict) else None
    if isinstance(adult, dict) and isinstance(adult.get("flag_rate"), (int, float)):
        sentence += (f" Adult frontal chest films: {adult['flag_rate']:.0%} flagged"
                     + (f" (of {md_escape(adult['n'])})" if adult.get("n") is not None else "")
                     + "; the rest are read as if they were children's films, which this model was not trained on.")
    return sentence


def gate_tables(gate: dict) -> tuple[list[dict], list[dict]]:
    """(settings rows, per-group evaluation rows) for st.dataframe: plain values, no markup."""
    settings = [{"setting": str(k), "value": f"{v:.4g}" if isinstance(v, float) else str(v)} for k, v in gate.items()
                if k != "ood_eval" and not isinstance(v, (dict, list))]
    groups = []
    ood = gate.get("ood_eval")
    if isinstance(ood, dict):
        for group, row in ood.items():
            if isinstance(row, dict):
                groups.append({"group": str(group), **{str(k): _plain(v) for k, v in row.items()}})
    return settings, groups


def faithfulness_rows(meta, directory=None) -> tuple[list[dict], str | None]:
    """Rows of a heatmap-faithfulness table (``meta.faithfulness`` or ``faithfulness.json``) and an optional
    note; ``([], None)`` when there is none. Accepts a list of rows, ``{"rows": [...], ...}`` or
    ``{name: {column: value}}``."""
    data = getattr(meta, "faithfulness", None) or raw_meta(directory).get("faithfulness")
    if not data and directory:
        from model.artifact import ModelArtifactError, read_json

        try:
            data = read_json(directory, FAITHFULNESS_FILE)
        except (ModelArtifactError, OSError):
            return [], None
    note = None
    if isinstance(data, dict):
        note = next((str(data[k]) for k in ("description", "note", "metric") if isinstance(data.get(k), str)), None)
        if isinstance(data.get("rows"), list):
            data = data["rows"]
        elif all(isinstance(v, dict) for v in data.values()) and data:
            data = [{"name": str(k), **v} for k, v in data.items()]
        else:
            data = [data]
    if not isinstance(data, list):
        return [], None
    rows = [{str(k): _plain(v) for k, v in r.items()} for r in data if isinstance(r, dict)]
    return rows, note


# ---- robustness to re-exports -------------------------------------------------------------------------

_ROBUSTNESS_COLUMNS = {"mean": "mean |change in P|", "max": "max |change in P|", "over_target": "films over 0.10",
                       "flips": "decisions flipped", "confident_flips": "flipped, neither call UNCERTAIN"}


def robustness_table(meta, directory=None) -> tuple[list[dict], dict] | None:
    """Rows per re-export of ``robustness.json`` beside the weights (``benchmarks.robustness --out``) and
    ``{"n_films", "this_model"}``; None when there is none or it cannot be read.

    Why ``this_model``: a model re-finalised or fine-tuned into the same folder inherits the file, and figures of
    other weights must not read as this model's."""
    from model.artifact import ModelArtifactError, read_json
    from model.exports import LABELS

    try:
        data = read_json(directory, ROBUSTNESS_FILE) if directory else None
    except (ModelArtifactError, OSError):
        return None
    measured = ((data.get("models") or {}).get("model") if isinstance(data, dict) and isinstance(data.get("models"), dict)
                else None)
    per = measured.get("perturbations") if isinstance(measured, dict) else None
    if not isinstance(per, dict):
        return None
    rows = []
    for name, figures in per.items():
        if not isinstance(figures, dict):
            continue
        row = {"re-export": LABELS.get(str(name), str(name))}
        for key, column in _ROBUSTNESS_COLUMNS.items():
            v = figures.get(key)
            row[column] = v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
        rows.append(row)
    n = data.get("n_films")
    info = {"n_films": n if isinstance(n, int) and not isinstance(n, bool) else None,
            "this_model": bool(measured.get("weights_sha256")) and measured.get("weights_sha256") == meta.weights_sha256}
    return (rows, info) if rows else None


# ---- figures measured by others ---------------------------------------------------------------------

def independent_rows(meta, directory=None) -> list[dict]:
    """Figures measured by others on data this project does not hold (``independent.json`` beside the
    weights), one row each, saying whose weights they measured.

    Why the weights column: such figures arrive after a model ships, and the next model inherits the
    file; a figure of an earlier model must never read as this one's.
    """
    from model.artifact import ModelArtifactError, read_json

    try:
        data = read_json(directory, INDEPENDENT_FILE) if directory else None
    except (ModelArtifactError, OSError):
        return []
    entries = data.get("evaluations") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        return []
    parent = ((getattr(meta, "training", None) or {}).get("initialised_from") or {}).get("weights_sha256")
    rows = []
    for e in entries:
        if not isinstance(e, dict):
            continue
        sha = str(e.get("weights_sha256") or "")
        whose = ("this model" if sha and sha == meta.weights_sha256 else
                 "the model this one was fine-tuned from (not these weights)" if sha and sha == parent else
                 "another model (not these weights)")
        row = {"model": _plain(e.get("model")), "weights": whose, "data": _plain(e.get("data")),
               "measured by": _plain(e.get("measured_by"))}
        row.update({k: e[k] for k in _INDEPENDENT_METRICS if isinstance(e.get(k), (int, float)) and not isinstance(e.get(k), bool)})
        rows.append(row)
    return rows


def independent_line(rows: list[dict]) -> str:
    """The model card's **Measured independently** item (markdown, values escaped)."""
    def figures(r: dict) -> str:
        return ", ".join(f"{k} {r[k]:.3f}" for k in ("auc", "accuracy", "sensitivity", "specificity", "ece") if k in r)

    own = next((r for r in rows if r["weights"] == "this model"), None)
    if own is not None:
        return f"**Measured independently** on {md_escape(own['data'])}: {figures(own)}."
    text = "no figures of these weights have been measured on data outside this project yet"
    if rows:
        r = rows[0]
        text += f"; {md_escape(r['model'])}, {md_escape(r['weights'])}, scored {figures(r)} on {md_escape(r['data'])}"
    return f"**Measured independently**: {text}."


def _plain(v):
    if isinstance(v, (int, float, bool)) or v is None:
        return v
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)
