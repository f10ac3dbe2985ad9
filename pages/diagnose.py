"""Diagnose: upload X-rays, get P(pneumonia), a decision at the shared threshold, and Grad-CAM.

The title and uploader are drawn before the heavy imports so the page appears at once on a cold start.
"""

import streamlit as st

from ui.state import band, page_setup, threshold

DECISION_STYLE = {"PNEUMONIA": ":red-background[**PNEUMONIA**]", "NORMAL": ":green-background[**NORMAL**]",
                  "UNCERTAIN": ":orange-background[**UNCERTAIN**]"}
ss = st.session_state

st.title("Diagnose")
st.caption(
    "Drop one or more chest X-rays (JPEG, PNG, DICOM - `.dcm` or no extension). Images are processed in memory "
    "and never written to disk. The threshold and uncertain band are in the sidebar and are shared with the Model report page."
)
uploads = st.file_uploader("Chest X-rays", accept_multiple_files=True, key="uploads",
                           help="Any size from 64 px; up to 50 MB and 40 megapixels per file.")
loaded = page_setup()  # sidebar + cached model (imports torch & co on the first visit)
clf = loaded.clf

from model import CAM_LABELS, overlay  # noqa: E402  (already imported by page_setup; cheap here)
from model.plots import probability_gauge, side_by_side_figure  # noqa: E402
from model.report import decide  # noqa: E402
from model.results import png_bytes, record, records_csv, records_json, score_uploads, to_rgb  # noqa: E402

if not uploads:
    st.info("Upload an X-ray to see the model's probability, its decision and where it looked.", icon=":material/upload_file:")
    st.stop()

# ---- score every upload once per session (cache keyed by Streamlit's file id) -------------------
cache = ss.setdefault("_results", {})
new = [f for f in uploads if f.file_id not in cache]
if new:
    bar = st.progress(0.0, text=f"Analysing {len(new)} image(s)...")
    fresh = score_uploads(clf, [(f.name, f.getvalue()) for f in new],
                          progress=lambda done, total: bar.progress(min(done / total, 1.0)))
    cache.update({f.file_id: r for f, r in zip(new, fresh)})
    bar.empty()
current = {f.file_id for f in uploads}
for key in list(cache):  # forget removed uploads: memory stays bounded by what is on screen
    if key not in current:
        del cache[key]
results = [cache[f.file_id] for f in uploads]
t, b = threshold(), band()

for r in results:
    if not r.ok:
        st.error(f"**{r.name}** could not be analysed: {r.error}", icon=":material/broken_image:")
good = [i for i, r in enumerate(results) if r.ok]
if not good:
    st.stop()

# ---- batch table --------------------------------------------------------------------------------
records = [record(r, clf, t, b) for r in results]
if len(results) > 1:
    st.subheader(f"Results ({len(good)} of {len(results)} analysed)")
    rows = [{"thumbnail": r.thumbnail, "file": r.name,
             "P(pneumonia)": r.probability, "decision": rec["decision"]} for r, rec in zip(results, records)]
    st.dataframe(rows, hide_index=True, width="stretch", column_config={
        "thumbnail": st.column_config.ImageColumn("image", width="small"),
        "P(pneumonia)": st.column_config.ProgressColumn("P(pneumonia)", min_value=0.0, max_value=1.0, format="%.3f"),
    })
    st.download_button("Download all results (CSV)", records_csv(records), "cxr_results.csv", "text/csv",
                       icon=":material/download:")
    chosen = st.selectbox("Open an image", good, format_func=lambda i: results[i].name, key="open_index")
    index = chosen if chosen in good else good[0]
else:
    index = good[0]

# ---- one image in detail ------------------------------------------------------------------------
r, rec = results[index], records[index]
decision = decide(r.probability, t, b)
st.subheader(r.name)
st.caption(f"{r.size[0]} x {r.size[1]} px")
left, right = st.columns([1, 2.2], gap="large")
with left:
    st.plotly_chart(probability_gauge(r.probability, t, b), width="stretch", config={"displayModeBar": False})
    st.markdown(f"### Decision: {DECISION_STYLE[decision]}")
    st.caption(
        f"P(pneumonia) = {r.probability:.3f}; threshold {t:.2f}"
        + (f", uncertain between {max(0, t - b):.2f} and {min(1, t + b):.2f}." if b > 0 else ".")
    )
    c1, c2 = st.columns(2)
    c1.download_button("Result (JSON)", records_json(rec), f"{r.name}.result.json", "application/json",
                       icon=":material/download:", key="dl_json", width="stretch")
    c2.download_button("Result (CSV)", records_csv([rec]), f"{r.name}.result.csv", "text/csv",
                       icon=":material/download:", key="dl_csv", width="stretch")
with right:
    c1, c2 = st.columns(2)
    method = c1.selectbox("Explanation method", list(CAM_LABELS), format_func=CAM_LABELS.get, key="cam_method")
    opacity = c2.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="opacity")
    cams = ss.setdefault("_cams", {})
    cam_key = (r.sha256, method)
    if cam_key not in cams:
        with st.spinner(f"Computing {CAM_LABELS[method]}..."):
            heat = clf.explain(r.square, method=method)  # the scored input itself: heatmap and score agree
        cams.clear()  # keep one heatmap per session: the one on screen
        cams[cam_key] = heat
    blended = overlay(r.display, cams[cam_key], opacity)
    st.plotly_chart(side_by_side_figure(to_rgb(r.display), blended), width="stretch", key="xray_views",
                    config={"displaylogo": False, "scrollZoom": True})
    st.caption(
        f"{CAM_LABELS[method]} heatmap: **where the model looked** when scoring pneumonia - red is most influential. "
        "It is not a lesion map and can highlight regions outside the lungs. Drag to zoom (both views follow); double-click to reset."
    )
    st.download_button("Overlay (PNG)", png_bytes(blended), f"{r.name}.{method}.png", "image/png",
                       icon=":material/download:", key="dl_png")
