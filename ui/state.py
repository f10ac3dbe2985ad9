"""Streamlit glue shared by the pages: the cached model, shared threshold state, the sidebar.

Importing this module is cheap on purpose: torch and friends take ~10 s of CPU to import on a
small machine, so they are imported inside the cached loader, after the page has rendered.

The decision threshold and uncertainty band live in ``st.session_state`` under plain keys
(``threshold``, ``band``); the sidebar widgets that edit them are rendered on every page, so a
value tuned on one page is the value the other page uses.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st

if TYPE_CHECKING:  # the heavy imports (torch, torchvision, scikit-learn) happen in _load, after the
    import model  # page has drawn its first elements, so the user sees the page while they load
    from model.report import EvaluationReport

from model.decision import DEFAULT_BAND  # noqa: E402  (tiny module: no heavy imports)
DISCLAIMER = "**Research and education tool - not a medical device.** Not for diagnosis or treatment decisions."


def model_caption(name: str, meta) -> str:
    """The sidebar's model line; a model re-finalised without training (``--epochs 0``) does not claim a training date."""
    made = "re-finalised" if (meta.training or {}).get("epochs_run") == 0 else "trained"
    return (f"**Model** `{name}`  \n{meta.architecture}, {meta.input_size} px, {made} {meta.created[:10] or 'unknown'}  \n"
            f"weights `{meta.weights_sha256[:12]}`")


def disclaimer(loaded: Loaded | None) -> str:
    """The disclaimer, naming the loaded model's own training data (a retrained model says what it saw)."""
    from ui.model_card import scope_sentence

    return f"{DISCLAIMER} {scope_sentence(loaded.clf.meta.training if loaded is not None else None)}"


PRESET_LABELS = {"default": "Default (screening)", "youden": "Youden's J", "high_sensitivity": "Sensitivity ≥ 95%, edge"}
PRESET_HELP = {
    "default": "The most specific threshold keeping validation sensitivity >= 95% plus two standard errors.",
    "youden": "Maximises sensitivity + specificity on the validation split.",
    "high_sensitivity": "The most specific threshold whose validation sensitivity is still >= 95% (no margin).",
}


@dataclass
class Loaded:
    clf: model.Classifier
    report: EvaluationReport | None
    history: list | None
    report_error: str | None = None  # a report.json that could not be used: the model still serves


THREADS_ENV = "CXR_TORCH_THREADS"


def _serving_threads() -> None:
    """Torch intra-op threads while serving: 1 by default (measured in benchmarks/benchmark.py: on a
    2-core machine a second torch thread fights the browser and the Streamlit server for the cores);
    ``CXR_TORCH_THREADS`` overrides it (0 = torch's default)."""
    import torch

    n = int(os.environ.get(THREADS_ENV, "1") or 0)
    if n > 0:
        torch.set_num_threads(n)


@st.cache_resource(show_spinner="Loading the model (first visit only)...")
def _load(model_dir: str) -> Loaded:
    import numpy as np

    import model
    from model.report import EvaluationReport

    from model.artifact import REPORT_FILE, ModelArtifactError
    from model.report import ReportError

    _serving_threads()
    clf = model.load_model(model_dir)
    report, report_error = None, None
    try:  # a broken report costs the report page, not the model
        data = clf.report()
        report = EvaluationReport(data) if data else None
    except (ModelArtifactError, ReportError, ValueError, RecursionError) as err:
        report_error = f"{REPORT_FILE} in the model directory is not usable: {err}"
    try:
        history = clf.history()
    except (ModelArtifactError, ValueError, RecursionError):
        history = None
    # warm-up: one prediction and one Grad-CAM, so the first user upload does not pay for lazy
    # imports (pytorch-grad-cam, OpenCV) and first-call allocations
    probe = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (96, 1))
    clf.predict_proba(probe)
    clf.explain(probe)
    return Loaded(clf, report, history if isinstance(history, list) else None, report_error)


def get_loaded() -> tuple[Loaded | None, str | None]:
    """The cached model bundle, or an error message (failures are not cached: fix and reload)."""
    import model
    from model.artifact import ModelArtifactError
    from model.report import ReportError

    directory = model.default_model_dir()
    if not (Path(directory) / "model.json").is_file():
        return None, (
            f"No model found in `{directory}`. The shipped model lives in `assets/model/`; "
            "set `CXR_MODEL_DIR` to use another, or train one with `uv run python -m training.train` (see README)."
        )
    try:
        return _load(str(directory)), None
    except (ModelArtifactError, ReportError, ValueError, OSError) as err:
        return None, f"The model in `{directory}` could not be loaded: {err}"


ENTERED = "_entered_via_entrypoint"  # set by streamlit_app.py before it runs a page
DEEP_LINK = "_deep_link"  # the page file a first visitor asked for, while it goes through the entrypoint


def page_setup(page_file: str | None = None) -> Loaded:
    """Every page starts here: the shared sidebar, then the model or a clear error page.

    Pages render the sidebar themselves (rather than the entrypoint) so it is present on every
    run, including reruns that Streamlit's AppTest executes page-only.

    ``page_file`` (the page's ``__file__``): until some session has called ``st.navigation``, Streamlit
    treats ``pages/`` as a legacy multipage folder, so a link straight to ``/report`` as the first visit
    after the server starts runs that file alone, without the entrypoint's page config and navigation.
    Such a run goes through the entrypoint, which then opens the page that was asked for.
    """
    if page_file and not st.session_state.get(ENTERED):
        st.session_state[DEEP_LINK] = Path(page_file).name
        st.switch_page("streamlit_app.py")
    loaded, error = get_loaded()
    sidebar(loaded)
    if loaded is None:
        st.error(error, icon=":material/error:")
        st.stop()
    return loaded


def _init(loaded: Loaded) -> None:
    ss = st.session_state
    sha = loaded.clf.meta.weights_sha256
    if ss.get("model_sha") != sha:  # first run, or a different model: reset to its defaults
        ss.model_sha = sha
        ss.threshold = float(loaded.clf.threshold)
        ss.band = DEFAULT_BAND
    # widgets on different pages are different widgets to Streamlit, even with one key: re-seed them
    # from the persistent keys on every run so the value follows the user across pages
    ss._threshold_widget = ss.threshold
    ss._band_widget = ss.band


def _set_threshold(value: float) -> None:
    st.session_state.threshold = float(value)
    st.session_state._threshold_widget = float(value)


def _sync_widgets() -> None:
    st.session_state.threshold = float(st.session_state._threshold_widget)
    st.session_state.band = float(st.session_state._band_widget)


def presets(loaded: Loaded) -> dict[str, float]:
    """The model's default threshold and its named operating points, each value shown once
    (the training CLI also stores the default as "screening": that would be a duplicate button)."""
    meta = loaded.clf.meta
    out = {"default": float(meta.threshold)}
    for k, v in meta.operating_points.items():
        if k in PRESET_LABELS and all(abs(float(v) - o) > 5e-4 for o in out.values()):
            out[k] = float(v)
    return out


def threshold() -> float:
    return float(st.session_state.get("threshold", 0.5))


def band() -> float:
    return float(st.session_state.get("band", DEFAULT_BAND))


_pending = threading.local()  # per script thread: the sidebar slot finish_sidebar() fills


def finish_sidebar() -> None:
    """The sidebar's expected sensitivity/specificity, drawn after the page itself.

    The first computation imports scikit-learn (~3-4 s of CPU here); drawn in place, it delayed a
    cold start's first decision by that much. Each page calls this last (or ui.state.stop())."""
    pending, _pending.expected = getattr(_pending, "expected", None), None
    if pending is None:
        return
    slot, report = pending
    from model.report import escape_markdown

    m = report.at(threshold())
    with slot:
        c1, c2 = st.columns(2)
        c1.metric("Sensitivity", f"{m['sensitivity']:.1%}")
        c2.metric("Specificity", f"{m['specificity']:.1%}")
        st.caption(f"Expected at this threshold: measured on the model's {escape_markdown(report.split)} split "
                   f"({report.n} images). New data may differ.")


def stop() -> None:
    """``st.stop()`` for pages: completes the sidebar first (nothing can be drawn after st.stop)."""
    finish_sidebar()
    st.stop()


def sidebar(loaded: Loaded | None) -> None:
    with st.sidebar:
        if loaded is not None:
            _init(loaded)
            meta = loaded.clf.meta
            st.subheader("Decision threshold")
            st.slider("P(pneumonia) at or above this is called PNEUMONIA", 0.0, 1.0, step=0.001,
                      key="_threshold_widget", on_change=_sync_widgets, format="%.3f")
            points = presets(loaded)
            default = points.pop("default")
            st.button(f"Reset to the model's default: {default:.3f}", key="preset_default", on_click=_set_threshold,
                      args=(default,), help=PRESET_HELP["default"], width="stretch", icon=":material/restart_alt:",
                      disabled=abs(threshold() - default) < 5e-7)
            for key, value in points.items():
                st.button(f"{PRESET_LABELS[key]}: {value:.3f}", key=f"preset_{key}", on_click=_set_threshold,
                          args=(value,), help=PRESET_HELP[key], width="stretch")
            if loaded.report is not None:  # filled by finish_sidebar() once the page has drawn
                _pending.expected = (st.container(), loaded.report)
            if loaded.report_error:
                from model.report import escape_markdown

                st.warning("No expected sensitivity/specificity: " + escape_markdown(loaded.report_error)
                           + " The model itself works.", icon=":material/warning:")
            st.slider("Uncertain band (+/- around the threshold)", 0.0, 0.3, step=0.005, key="_band_widget",
                      on_change=_sync_widgets, format="%.3f",
                      help="Probabilities this close to the threshold are reported as UNCERTAIN.")
            st.divider()
            st.caption(model_caption(loaded.clf.name, meta))
        st.info(disclaimer(loaded), icon=":material/info:")
