"""The Diagnose page's re-export check: the film on screen re-scored as other devices and exports would have made it.

Computed only when asked (about half a second to a few seconds: one batched pass over a dozen images) and kept in
``st.session_state`` by the image's checksum, in memory like every result.
"""

from __future__ import annotations

import streamlit as st

from model.decision import decide
from model.exports import EXPORTS, LABELS
from model.stability import STABLE_CHANGE, ExportStability, export_stability


def _verdict(s: ExportStability, threshold: float, band: float) -> tuple[str, str]:
    changed, decisions = s.changed_decisions(threshold, band), s.decisions(threshold, band)
    n = len(s.scores)
    if changed:
        calls = sorted({decisions[k] for k in changed})
        return "warning", (f"**The decision depends on how this film was exported:** {len(changed)} of {n} re-exports "
                           f"are called {' / '.join(calls)} at this threshold ({', '.join(LABELS[k] for k in changed)}). "
                           "Read this score with care.")
    if s.max_change > STABLE_CHANGE:
        worst = max(s.changes, key=lambda k: abs(s.changes[k]))
        return "warning", (f"**The score moves with the export** by up to {s.max_change:.3f} ({LABELS[worst]}), "
                           f"more than the {STABLE_CHANGE:.2f} the model aims for; the decision holds on all {n} re-exports.")
    return "success", (f"**Stable:** all {n} re-exports score within {s.max_change:.3f} of this film, and every one gets the "
                       "same decision.")


def stability_panel(clf, result, threshold: float, band: float) -> None:
    """An expander with the check, run on request; ``result`` is the page's UploadResult."""
    store = st.session_state.setdefault("_stability", {})
    with st.expander("Does this score depend on how the film was exported?", icon=":material/tune:"):
        st.caption("Re-scores this film as a softer device, another gamma or contrast, JPEG, blur, sharpening, noise or a "
                   "larger original would have made it - the re-exports of the robustness benchmark (Model report). "
                   "A stable score is not a correct one; an unstable one says the film is hard for the model.")
        s = store.get(result.sha256)
        if s is None:
            if not st.button(f"Re-score {len(EXPORTS)} re-exports", icon=":material/replay:", key=f"stability_{result.sha256[:16]}"):
                return
            with st.spinner("Re-scoring the re-exports..."):
                s = store[result.sha256] = export_stability(clf, result.display)
        kind, text = _verdict(s, threshold, band)
        getattr(st, kind)(text)
        rows = [{"export": "this film (display copy)", "P(pneumonia)": s.probability, "change": 0.0,
                 "decision": decide(s.probability, threshold, band)}]
        decisions = s.decisions(threshold, band)
        rows += [{"export": LABELS[k], "P(pneumonia)": p, "change": p - s.probability, "decision": decisions[k]}
                 for k, p in s.scores.items()]
        st.dataframe(rows, hide_index=True, width="stretch", key=f"stability_table_{result.sha256[:16]}", column_config={
            "P(pneumonia)": st.column_config.NumberColumn(format="%.3f"),
            "change": st.column_config.NumberColumn(format="%+.3f")})
        if s.skipped:
            st.caption("Not made of this image: " + "; ".join(f"{LABELS[k]} ({why})" for k, why in s.skipped.items()) + ".")
