"""Diagnose: upload X-rays, get P(pneumonia), a decision at the shared threshold, and a heatmap.

The title and uploader are drawn before the heavy imports so the page appears at once on a cold start.
Results live in ``st.session_state`` (in memory, never on disk) so they survive a visit to the
Model report page; the detail area is a fragment, so its widgets rerun only that area.
"""

import streamlit as st

from ui.state import band, finish_sidebar, page_setup, stop, threshold

DECISION_STYLE = {"PNEUMONIA": ":red-background[**PNEUMONIA**]", "NORMAL": ":green-background[**NORMAL**]",
                  "UNCERTAIN": ":orange-background[**UNCERTAIN**]", "NOT_ASSESSED": ":gray-background[**NOT ASSESSED**]"}
ss = st.session_state


def _sync_uploads() -> None:
    """The uploader changed (files added or removed with its x): forget results of removed files.

    Results restored after a page switch are not in the uploader (Streamlit cannot re-fill it), so
    only files that were in the uploader on the previous run and are gone now are dropped."""
    now = {f.file_id for f in (ss.get("uploads") or [])}
    results = ss.setdefault("_results", {})
    for key in ss.get("_uploader_ids", set()) - now:
        results.pop(key, None)


def _clear_results() -> None:
    ss._results = {}
    ss._cams = {}
    ss._stability = {}
    ss.pop("_open", None)


def _open_row() -> None:
    rows = ss.batch_table.selection.rows
    if rows:
        ss._open = ss._table_keys[rows[0]]


def _check_text(r) -> str:
    if r.flagged:
        return r.check.reason or "not like the training films"
    return "ok" + (f" ({r.check.reason})" if r.check.reason else "")


def _open_chosen() -> None:
    ss._open = ss._open_widget


st.title("Diagnose")
st.caption(
    "Drop one or more chest X-rays (JPEG, PNG, DICOM - `.dcm` or no extension). Images are processed in memory "
    "and never written to disk. The threshold and uncertain band are in the sidebar and are shared with the Model report page."
)
uploads = st.file_uploader("Chest X-rays", accept_multiple_files=True, key="uploads", on_change=_sync_uploads,
                           help="Any size from 64 px; up to 50 MB and 40 megapixels per file.")
loaded = page_setup(__file__)  # sidebar + cached model (imports torch & co on the first visit)
clf = loaded.clf

from model import CAM_LABELS, DEFAULT_CAM_METHOD  # noqa: E402  (already imported by page_setup; cheap here)
from model.decision import decide  # noqa: E402
from model.results import (  # noqa: E402
    DICOM_TAGS, json_record, record, records_csv, records_json, result_decision, score_uploads,
)
from ui.stability import stability_panel  # noqa: E402
from ui.viewer import jpeg_data_uri, overlay_png, probability_gauge, xray_figure  # noqa: E402

# ---- score new uploads once per session (keyed by Streamlit's file id) ---------------------------
cache = ss.setdefault("_results", {})
uploads = uploads or []
new = [f for f in uploads if f.file_id not in cache]
if new:
    bar = st.progress(0.0, text=f"Analysing {len(new)} image(s)...") if len(new) > 1 else None
    fresh = score_uploads(clf, [(f.name, f.getvalue()) for f in new],
                          progress=(lambda done, total: bar.progress(min(done / total, 1.0))) if bar else None)
    cache.update({f.file_id: r for f, r in zip(new, fresh)})
    if bar:
        bar.empty()
    if len(new) == 1 and fresh[0].ok:
        ss._open = new[0].file_id  # a single new upload is what the user wants to see
ss._uploader_ids = {f.file_id for f in uploads}

if not cache:
    st.info("Upload an X-ray to see the model's probability, its decision and where it looked.", icon=":material/upload_file:")
    stop()

keys = list(cache)
results = [cache[k] for k in keys]
restored = [k for k in keys if k not in ss._uploader_ids]
if restored:
    c1, c2 = st.columns([4, 1], vertical_alignment="center")
    c1.caption(f"Showing {len(restored)} earlier result(s) from this session (kept in memory only; the images are "
               "not in the upload box any more).")
    c2.button("Clear results", icon=":material/delete:", on_click=_clear_results, key="clear_results", width="stretch")
t, b = threshold(), band()

# ---- files that could not be read: one compact list ---------------------------------------------
bad = [r for r in results if not r.ok]
if bad:
    names = ", ".join(r.name for r in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    st.error(f"{len(bad)} of {len(results)} file(s) could not be analysed: {names}.", icon=":material/broken_image:")
    with st.expander("Why, and what you can do", expanded=len(bad) <= 3):
        st.dataframe([{"file": r.name, "problem and what to do": r.error} for r in bad], hide_index=True, width="stretch",
                     height=min(400, 38 + 35 * len(bad)))
good_keys = [k for k in keys if cache[k].ok]
if not good_keys:
    stop()

# ---- batch table (click a row to open it) --------------------------------------------------------
records = {k: record(cache[k], clf, t, b) for k in keys}
if len(results) > 1:
    flagged = sum(cache[k].flagged for k in good_keys)
    st.subheader(f"Results ({len(good_keys)} of {len(results)} analysed"
                 + (f", {flagged} not assessed: not like a frontal chest X-ray" if flagged else "") + ")")
    rows = [{"thumbnail": cache[k].thumbnail, "file": cache[k].name, "P(pneumonia)": cache[k].probability,
             "decision": records[k]["decision"].replace("_", " "), "input check": _check_text(cache[k])}
            for k in good_keys]
    ss._table_keys = good_keys
    st.dataframe(rows, hide_index=True, width="stretch", key="batch_table", on_select=_open_row,
                 selection_mode="single-row", column_config={
                     "thumbnail": st.column_config.ImageColumn("image", width="small"),
                     "P(pneumonia)": st.column_config.ProgressColumn("P(pneumonia)", min_value=0.0, max_value=1.0, format="%.3f"),
                 })
    st.caption("Click a row to open that image.")
    st.download_button("Download all results (CSV)", records_csv([records[k] for k in keys]), "cxr_results.csv", "text/csv",
                       icon=":material/download:", on_click="ignore")
if ss.get("_open") not in good_keys:
    ss._open = good_keys[0]
if len(results) > 1:  # the widget is re-seeded from the persistent key: the choice survives page switches
    ss._open_widget = ss._open
    st.selectbox("Open an image", good_keys, format_func=lambda k: cache[k].name, key="_open_widget", on_change=_open_chosen)
open_key = ss._open


# ---- one image in detail -------------------------------------------------------------------------
@st.fragment
def detail(key: str) -> None:
    r = cache[key]
    t, b = threshold(), band()
    rec = record(r, clf, t, b)
    decision = result_decision(r, t, b)
    st.subheader(r.name)
    st.caption(f"{r.size[0]} x {r.size[1]} px" + (f" · {r.format}" if r.format else ""))
    left, right = st.columns([1, 2.2], gap="large")
    show = True
    with left:
        if r.flagged:
            st.markdown(f"### Decision: {DECISION_STYLE[decision]}")
            st.warning(f"**This does not look like a frontal chest X-ray:** {r.check.reason or 'it is unlike the training films.'}  \n"
                       "The model was not made for this image, so it gives no PNEUMONIA/NORMAL decision.",
                       icon=":material/block:")
            show = st.toggle("Show the model's output anyway", key=f"anyway_{r.sha256[:16]}",
                             help="For inspection only: the probability and heatmap of an image the model was not made for are unreliable.")
            if show:
                would = decide(r.probability, t, b)  # what it would say were the input not flagged
                st.caption(f":orange[**Unreliable**] - the model would say **{would}** (P = {r.probability:.3f}); "
                           "the input check says this image is outside what it was trained on.")
        if show:
            st.plotly_chart(probability_gauge(r.probability, t, b), width="stretch", config={"displayModeBar": False},
                            key="gauge")
        if not r.flagged:
            st.markdown(f"### Decision: {DECISION_STYLE[decision]}")
        prev = clf.meta.prevalence
        st.caption(
            f"P(pneumonia) = {r.probability:.3f}"
            + (f" (calibrated where {prev:.0%} of films show pneumonia: lower where it is rarer, see the Model report)"
               if prev is not None else "")
            + f"; threshold {t:.3f}"
            + (f", uncertain between {max(0, t - b):.3f} and {min(1, t + b):.3f}." if b > 0 else ".")
        )
        if r.dicom:
            st.markdown("**DICOM**  \n" + "  \n".join(f"{DICOM_TAGS[k]}: `{v}`" for k, v in r.dicom.items() if k in DICOM_TAGS))
        c1, c2 = st.columns(2)
        c1.download_button("Result (JSON)", records_json(json_record(rec, r)), f"{r.name}.result.json", "application/json",
                           icon=":material/download:", key="dl_json", width="stretch", on_click="ignore")
        c2.download_button("Result (CSV)", records_csv([rec]), f"{r.name}.result.csv", "text/csv",
                           icon=":material/download:", key="dl_csv", width="stretch", on_click="ignore")
    with right:
        if not show:
            st.image(r.display, caption="The image as decoded (no model output shown).", width="stretch")
            return
        c1, c2 = st.columns(2)
        method = c1.selectbox("Explanation method", list(CAM_LABELS), index=list(CAM_LABELS).index(DEFAULT_CAM_METHOD),
                              format_func=CAM_LABELS.get, key="cam_method",
                              help=f"{CAM_LABELS[DEFAULT_CAM_METHOD]} is the default: the most faithful for this model (see the "
                                   "Model report). Grad-CAM and Grad-CAM++ come with the prediction; EigenCAM and LayerCAM "
                                   "need a backward pass and an extra library (a few seconds on first use).")
        opacity = c2.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="opacity")
        cams = ss.setdefault("_cams", {})
        cam_key = (r.sha256, method)
        if cam_key not in cams:
            if method == DEFAULT_CAM_METHOD and r.heatmap is not None:
                heat = r.heatmap.astype("float32")  # computed with the score, from the same forward pass
            else:
                with st.spinner(f"Computing {CAM_LABELS[method]}..."):
                    heat = clf.analyze(r.square, method=method).heatmap  # the scored input itself: heatmap and score agree
            for k in [k for k in cams if k[0] != r.sha256]:  # keep the heatmaps of the image on screen only
                del cams[k]
            cams[cam_key] = heat
        heat = cams[cam_key]
        if r.display_uri is None:
            r.display_uri = jpeg_data_uri(r.display)
        st.plotly_chart(xray_figure(r.display, heat, opacity, image_uri=r.display_uri, revision=r.sha256), width="stretch", key="xray_views",
                        config={"displaylogo": False, "scrollZoom": True, "doubleClick": "reset"})
        st.caption(
            f"{CAM_LABELS[method]} heatmap: **where the model looked** when scoring pneumonia - red is most influential. "
            "It is not a lesion map and can highlight regions outside the lungs. Drag to zoom (both views follow); "
            "double-click to reset." + (" :orange[**Unreliable: the input check flagged this image.**]" if r.flagged else "")
        )
        st.download_button("Overlay (PNG)", lambda: overlay_png(r.display, heat, opacity), f"{r.name}.{method}.png",
                           "image/png", icon=":material/download:", key="dl_png", on_click="ignore")
    if not r.flagged:
        stability_panel(clf, r, t, b)


detail(open_key)
finish_sidebar()  # last: its first call imports scikit-learn, which must not delay the page
