"""Model report: how good the model is, at the threshold chosen in the sidebar.

The title is drawn before the heavy imports so the page appears at once on a cold start.
"""

import streamlit as st

from ui.state import band, page_setup, threshold

st.title("Model report")
loaded = page_setup()  # sidebar + cached model (imports torch & co on the first visit)
clf, meta = loaded.clf, loaded.clf.meta

from ui.charts import (  # noqa: E402  (plotly: cheap once page_setup has run)
    confusion_figure, histogram_figure, pr_figure, reliability_figure, roc_figure, training_curves_figure,
)
from model.report import EvaluationReport, ReportError  # noqa: E402

uploaded_report = st.file_uploader(
    "Optional: load another evaluation report (JSON from `python -m training.evaluate`)", type=["json"], key="other_report",
)
report = loaded.report
if uploaded_report is not None:
    try:
        report = EvaluationReport.from_bytes(uploaded_report.getvalue())
    except ReportError as err:
        st.error(f"That file is not a usable report: {err}", icon=":material/error:")
if report is None:
    st.warning("The model directory has no `report.json`; evaluate it with `python -m training.evaluate` and load the result above.")
    st.stop()

t, b = threshold(), band()
m = report.at(t)
ci = report.auc_ci
st.caption(
    f"Scores of **{report.model_name}** on the **{report.split}** split: {report.n} images "
    f"({int(report.y.sum())} pneumonia, {int(report.n - report.y.sum())} normal). Metrics are as measured on that split. "
    "Move the threshold in the sidebar: every chart and number below follows it."
)
if report.split == "val":
    st.info(
        "This is the patient-grouped validation split carved from the training folder: the same hospital and "
        "period as the training images. Expect lower figures on data from elsewhere.", icon=":material/info:")

cols = st.columns(7)
cols[0].metric("AUC", f"{report.auc:.3f}", help=f"95% CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else None)
for col, (key, label) in zip(cols[1:], [("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
                                        ("ppv", "PPV (precision)"), ("npv", "NPV"), ("f1", "F1")]):
    col.metric(label, f"{m[key]:.3f}")

c1, c2 = st.columns(2)
c1.plotly_chart(roc_figure(report, t), width="stretch", key="roc")
c2.plotly_chart(confusion_figure(m), width="stretch", key="confusion")
c1.plotly_chart(pr_figure(report, t), width="stretch", key="pr")
c2.plotly_chart(histogram_figure(report, t, b), width="stretch", key="hist")
cm = m["confusion_matrix"]
st.markdown(
    f"At threshold **{t:.2f}**: {cm['tp']} of {cm['tp'] + cm['fn']} pneumonia films flagged (sensitivity {m['sensitivity']:.1%}), "
    f"{cm['fp']} of {cm['fp'] + cm['tn']} normal films falsely flagged (specificity {m['specificity']:.1%})."
)

st.subheader("Calibration")
c1, c2 = st.columns([2, 1])
c1.plotly_chart(reliability_figure(report), width="stretch", key="reliability")
c2.markdown(
    f"Calibration P = sigmoid(margin / T + b) with **T = {meta.temperature:.3f}, b = {meta.bias:+.3f}** (fitted on the validation "
    "split) makes probabilities match observed frequencies: T corrects over-confidence, b the shift from the class-weighted "
    "loss. It does not change the ranking, so AUC and the ROC curve are unaffected.\n\n"
    f"- ECE before: **{report.reliability_uncalibrated['ece']:.4f}**\n- ECE after: **{report.reliability_calibrated['ece']:.4f}**"
)
st.caption("The calibration and the ECE shown here come from the same validation split, so the 'after' figure is optimistic.")

if loaded.history and uploaded_report is None:
    st.subheader("Training curves")
    st.plotly_chart(training_curves_figure(loaded.history), width="stretch", key="history")

st.subheader("Model card")
train = meta.training
st.markdown(f"""
- **Model**: `{clf.name}`: {meta.architecture} trained from scratch (no pretrained weights), {meta.input_size} x {meta.input_size} grayscale input,
  images squashed to a square (as the training copies were made). Weights sha256 `{meta.weights_sha256[:16]}...`.
- **Data**: pediatric chest X-rays of Kermany et al., *Cell* 2018 (CC BY 4.0): Guangzhou Women and Children's Medical Center,
  children aged 1-5, anterior-posterior films; {train.get('train_images', '?')} training and {train.get('val_images', '?')} validation images,
  split by patient.
- **Intended use**: research and education: exploring how a CNN screens for pneumonia and how thresholds trade sensitivity
  for specificity. **Not a medical device; not for diagnosis or treatment decisions.**
- **Limitations**: one centre, one age band, one projection; adult films, lateral views, other devices and other
  diseases are outside what it has seen. It does not distinguish bacterial from viral pneumonia. The heatmaps show where
  the model looked, not where disease is.
- **Operating points** (chosen on the validation split): {", ".join(f"{k} {v:.3f}" for k, v in {"default": meta.threshold, **meta.operating_points}.items())}.
""")
