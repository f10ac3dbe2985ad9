"""Model report: how good the model is, at the threshold chosen in the sidebar.

The title is drawn before the heavy imports so the page appears at once on a cold start.
"""

import json

import streamlit as st

from ui.state import band, finish_sidebar, page_setup, stop, threshold

st.title("Model report")
loaded = page_setup(__file__)  # sidebar + cached model (imports torch & co on the first visit)
clf, meta = loaded.clf, loaded.clf.meta

from ui import model_card as card  # noqa: E402
from ui.charts import (  # noqa: E402  (plotly: cheap once page_setup has run)
    PLOTLY_CONFIG, confusion_figure, histogram_figure, pr_figure, reliability_figure, roc_figure, training_curves_figure,
)
from ui.gallery import gallery_section, uncertain_sentence  # noqa: E402
from model.report import EvaluationReport, ReportError, escape_markdown  # noqa: E402

uploaded_report = st.file_uploader(
    "Optional: load another evaluation report (JSON from `python -m training.evaluate`)", type=["json"], key="other_report",
)
report = loaded.report
if uploaded_report is not None:
    try:
        report = EvaluationReport.from_bytes(uploaded_report.getvalue())
    except ReportError as err:
        st.error(f"That file is not a usable report: {escape_markdown(err)}", icon=":material/error:")
if report is None:
    if loaded.report_error:
        st.error(escape_markdown(loaded.report_error) + " Evaluate the model again with `python -m training.evaluate`, "
                 "or load a report above.", icon=":material/error:")
    else:
        st.warning("The model directory has no `report.json`; evaluate it with `python -m training.evaluate` and load the result above.")
    stop()

t, b = threshold(), band()
m = report.at(t)
ci = report.auc_ci
st.caption(
    f"Scores of **{card.md_escape(report.model_name)}** on the **{card.md_escape(report.split)}** split: {report.n} images "
    f"({int(report.y.sum())} pneumonia, {int(report.n - report.y.sum())} normal). Metrics are as measured on that split. "
    "Move the threshold in the sidebar: every chart and number below follows it."
)
notice = card.split_notice(report)
if notice:
    st.info(notice, icon=":material/info:")

cols = st.columns(7)
cols[0].metric("AUC", f"{report.auc:.3f}", help=f"95% CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else None)
for col, (key, label) in zip(cols[1:], [("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
                                        ("ppv", "PPV (precision)"), ("npv", "NPV"), ("f1", "F1")]):
    col.metric(label, f"{m[key]:.3f}")

c1, c2 = st.columns(2)
c1.plotly_chart(roc_figure(report, t), width="stretch", key="roc", config=PLOTLY_CONFIG)
c2.plotly_chart(confusion_figure(m), width="stretch", key="confusion", config=PLOTLY_CONFIG)
c1.plotly_chart(pr_figure(report, t), width="stretch", key="pr", config=PLOTLY_CONFIG)
c2.plotly_chart(histogram_figure(report, t, b), width="stretch", key="hist", config=PLOTLY_CONFIG)
cm = m["confusion_matrix"]
st.markdown(
    f"At threshold **{t:.3f}**: {cm['tp']} of {cm['tp'] + cm['fn']} pneumonia films flagged (sensitivity {m['sensitivity']:.1%}), "
    f"{cm['fp']} of {cm['fp'] + cm['tn']} normal films falsely flagged (specificity {m['specificity']:.1%}). "
    + uncertain_sentence(report, t, b)
)

c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
prevalence = c1.number_input(
    "Pneumonia prevalence where you would use it (%)", min_value=0.1, max_value=99.9, value=10.0, step=1.0,
    format="%.1f", key="prevalence_pct",
    help="PPV and NPV depend on how common pneumonia is; sensitivity and specificity do not. The example default "
         "is 10%; set your own setting's.")
summary = report.summary_at(t, prevalence / 100)
ppv, npv = summary["at_prevalence"]["ppv"], summary["at_prevalence"]["npv"]
c2.caption(card.predictive_values_sentence(prevalence / 100, ppv, npv, float(report.y.mean()), m["ppv"], m["npv"]))

points = card.operating_points(meta)
st.dataframe(
    [{"operating point": name, "threshold": round(v, 4), **{k: round(report.at(v)[k], 3) for k in
      ("sensitivity", "specificity", "ppv", "npv")}} for name, v in points.items()],
    hide_index=True, width="content", key="points",
)
st.download_button(
    "Figures at this threshold (JSON)", json.dumps(summary, indent=2), f"cxr_report_t{t:.3f}.json",
    "application/json", icon=":material/download:", key="dl_summary", on_click="ignore",
    help="AUC, the metrics at this threshold and PPV/NPV at the prevalence set above, with the model and split they "
         "were measured on.")

st.subheader("Where it goes wrong")
st.caption("The films of this report the model gets wrong at the current threshold, most confidently wrong first. "
           "Click a film's button to see it with its heatmap.")
if st.toggle("Show the error gallery", key="gallery_open"):
    gallery_section(clf, report, t, b)

st.subheader("Calibration")
c1, c2 = st.columns([2, 1])
c1.plotly_chart(reliability_figure(report), width="stretch", key="reliability", config=PLOTLY_CONFIG)
c2.markdown(
    f"Calibration P = sigmoid(margin / T + b) with **T = {meta.temperature:.3f}, b = {meta.bias:+.3f}** (fitted on the "
    "model's validation split) makes probabilities match observed frequencies: T corrects over-confidence, b the shift "
    "from the class-weighted loss. It does not change the ranking, so AUC and the ROC curve are unaffected.\n\n"
    f"- ECE before: **{report.reliability_uncalibrated['ece']:.4f}**\n- ECE after: **{report.reliability_calibrated['ece']:.4f}**"
)
st.caption(card.calibration_caption(report))
if (note := card.prevalence_note(meta)) is not None:
    st.caption(note)

if loaded.history and uploaded_report is None:
    st.subheader("Training curves")
    st.plotly_chart(training_curves_figure(loaded.history, meta.training.get("best_epoch")), width="stretch", key="history", config=PLOTLY_CONFIG)

gate = card.gate_figures(meta, clf.directory)
if gate:
    st.subheader("Input gate")
    st.markdown(card.gate_summary(gate))
    settings, groups = card.gate_tables(gate)
    c1, c2 = st.columns([1, 2])
    if settings:
        c1.dataframe(settings, hide_index=True, width="stretch", key="gate_settings")
    if groups:
        c2.dataframe(groups, hide_index=True, width="stretch", key="gate_groups",
                     column_config={"flag_rate": st.column_config.NumberColumn("flag rate", format="percent"),
                                    "auroc": st.column_config.NumberColumn("AUROC", format="%.3f")})

faith_rows, faith_note = card.faithfulness_rows(meta, clf.directory)
if faith_rows:
    st.subheader("Heatmap faithfulness")
    st.caption("How faithfully each heatmap method and layer points at what drives the model's score, by ROAD "
               "(remove and debias) on validation films, as stored with the model.")
    if faith_note:
        st.text(faith_note)
    st.dataframe(faith_rows, hide_index=True, width="content", key="faithfulness")

robustness = card.robustness_table(meta, clf.directory)
if robustness:
    rows, info = robustness
    st.subheader("Robustness to how a film was exported")
    st.caption(f"How far P(pneumonia) moves when each of {info['n_films'] or 'the'} validation films is re-exported another way - "
               "the re-exports the Diagnose page's check uses - measured by `benchmarks/robustness.py` and stored with the "
               "model. Target: mean <= 0.01 and max <= 0.10 per re-export. Decisions at the model's default threshold.")
    if not info["this_model"]:
        st.warning("These figures were measured on other weights than this model's (the file was left from an earlier "
                   "model): re-run `benchmarks/robustness.py --out` for this one.", icon=":material/warning:")
    st.dataframe(rows, hide_index=True, width="stretch", height=38 + 35 * len(rows), key="robustness", column_config={
        c: st.column_config.NumberColumn(format="%.4f" if c.startswith("mean") else "%.3f")
        for c in ("mean |change in P|", "max |change in P|")})

independent = card.independent_rows(meta, clf.directory)
if independent:
    st.subheader("Measured independently")
    st.caption("Figures measured by others on data this project does not hold, as recorded beside the weights. "
               "The weights column says whether they measured this model.")
    st.dataframe(independent, hide_index=True, width="stretch", key="independent")

st.subheader("Model card")
train = meta.training or {}
st.markdown("\n".join([
    f"- {card.model_line(clf.name, meta)}",
    f"- {card.data_line(train)}",
    "- **Intended use**: research and education: exploring how a CNN screens for pneumonia and how thresholds trade "
    "sensitivity for specificity. **Not a medical device; not for diagnosis or treatment decisions.**",
    f"- {card.limitations_line(train)}",
    *([f"- {card.independent_line(independent)}"] if independent else []),
    "- **Operating points** (chosen on the model's validation split): "
    + ", ".join(f"{card.md_escape(k)} {v:.3f}" for k, v in card.operating_points(meta).items()) + ".",
]))
finish_sidebar()  # last: its first call imports scikit-learn, which must not delay the page
