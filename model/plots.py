"""Plotly figures for the dashboard: pure functions of a report (or an image) and a threshold."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .report import EvaluationReport

BLUE, RED, AMBER, GREY = "#1f77b4", "#d62728", "#f0a202", "#7f7f7f"
_LAYOUT = dict(margin=dict(l=10, r=10, t=40, b=10), template="plotly_white", height=380)


def _marker(x, y, text):
    return go.Scatter(x=[x], y=[y], mode="markers+text", text=[text], textposition="bottom right",
                      marker=dict(size=13, color=RED, symbol="x"), name="current threshold")


def roc_figure(report: EvaluationReport, threshold: float) -> go.Figure:
    roc, m = report.roc, report.at(threshold)
    ci = report.auc_ci
    auc_txt = f"AUC {report.auc:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color=GREY), name="chance"))
    fig.add_trace(go.Scatter(x=roc["fpr"], y=roc["tpr"], mode="lines", line=dict(color=BLUE, width=2.5), name=auc_txt,
                             customdata=roc["thresholds"], hovertemplate="FPR %{x:.3f}<br>TPR %{y:.3f}<br>threshold %{customdata:.3f}<extra></extra>"))
    fig.add_trace(_marker(1 - m["specificity"], m["sensitivity"], f"t={threshold:.2f}"))
    fig.update_layout(title=f"ROC curve - {auc_txt}", xaxis_title="1 - specificity (false-positive rate)",
                      yaxis_title="sensitivity (true-positive rate)", legend=dict(x=0.45, y=0.05), **_LAYOUT)
    fig.update_xaxes(range=[-0.01, 1.01])
    fig.update_yaxes(range=[-0.01, 1.01])
    return fig


def pr_figure(report: EvaluationReport, threshold: float) -> go.Figure:
    pr, m = report.pr, report.at(threshold)
    prevalence = report.y.mean()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[prevalence, prevalence], mode="lines", line=dict(dash="dash", color=GREY),
                             name=f"prevalence {prevalence:.2f}"))
    fig.add_trace(go.Scatter(x=pr["recall"], y=pr["precision"], mode="lines", line=dict(color=BLUE, width=2.5), name="precision-recall"))
    fig.add_trace(_marker(m["sensitivity"], m["ppv"], f"t={threshold:.2f}"))
    fig.update_layout(title="Precision-recall curve", xaxis_title="recall (sensitivity)", yaxis_title="precision (PPV)",
                      legend=dict(x=0.02, y=0.05), **_LAYOUT)
    return fig


def confusion_figure(metrics: dict, class_names=("NORMAL", "PNEUMONIA")) -> go.Figure:
    cm = metrics["confusion_matrix"]
    counts = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    text = [[f"{counts[i, j]}<br>{rates[i, j]:.1%} of {class_names[i].lower()}" for j in range(2)] for i in range(2)]
    fig = go.Figure(go.Heatmap(z=rates, x=[f"predicted {c}" for c in class_names], y=[f"actual {c}" for c in class_names],
                               text=text, texttemplate="%{text}", textfont=dict(size=16), colorscale="Blues",
                               zmin=0, zmax=1, showscale=False, hoverinfo="skip"))
    fig.update_layout(title=f"Confusion matrix at threshold {metrics['threshold']:.2f}", **_LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def histogram_figure(report: EvaluationReport, threshold: float, band: float = 0.0) -> go.Figure:
    fig = go.Figure()
    bins = dict(start=0, end=1, size=0.02)
    for label, name, color in ((0, "NORMAL", BLUE), (1, "PNEUMONIA", RED)):
        fig.add_trace(go.Histogram(x=report.scores[report.y == label], xbins=bins, name=f"actual {name}",
                                   marker_color=color, opacity=0.6))
    if band > 0:
        fig.add_vrect(x0=max(0, threshold - band), x1=min(1, threshold + band), fillcolor=AMBER, opacity=0.25, line_width=0)
    fig.add_vline(x=threshold, line=dict(color="black", width=2, dash="dash"), annotation_text=f"threshold {threshold:.2f}")
    fig.update_layout(barmode="overlay", title="Score distribution by true class" + (" (shaded: uncertain band)" if band > 0 else ""),
                      xaxis_title="P(pneumonia)",
                      yaxis_title="images (log scale)", yaxis_type="log", legend=dict(x=0.02, y=0.98), **_LAYOUT)
    return fig


def reliability_figure(report: EvaluationReport) -> go.Figure:
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color=GREY), name="perfect calibration"))
    for rel, name, color in ((report.reliability_uncalibrated, "raw softmax", GREY),
                             (report.reliability_calibrated, "calibrated", BLUE)):
        pts = [(x, y, n) for x, y, n in zip(rel["mean_predicted"], rel["fraction_positive"], rel["count"]) if n]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                 line=dict(color=color), name=f"{name} (ECE {rel['ece']:.3f})",
                                 customdata=[p[2] for p in pts], hovertemplate="predicted %{x:.2f}<br>observed %{y:.2f}<br>n=%{customdata}<extra></extra>"))
    fig.update_layout(title="Reliability diagram", xaxis_title="mean predicted P(pneumonia)",
                      yaxis_title="observed fraction with pneumonia", legend=dict(x=0.02, y=0.98), **_LAYOUT)
    return fig


def training_curves_figure(history: list[dict]) -> go.Figure:
    epochs = [h["epoch"] for h in history]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "validation AUC"))
    fig.add_trace(go.Scatter(x=epochs, y=[h["train_loss"] for h in history], name="train loss", line=dict(color=BLUE)), 1, 1)
    fig.add_trace(go.Scatter(x=epochs, y=[h["val_loss"] for h in history], name="val loss", line=dict(color=RED)), 1, 1)
    fig.add_trace(go.Scatter(x=epochs, y=[h["val_auc"] for h in history], name="val AUC", line=dict(color=BLUE)), 1, 2)
    if history and "val_auc_ema" in history[0]:
        fig.add_trace(go.Scatter(x=epochs, y=[h["val_auc_ema"] for h in history], name="val AUC (EMA weights)",
                                 line=dict(color=BLUE, dash="dot")), 1, 2)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(**_LAYOUT)
    return fig


def probability_gauge(probability: float, threshold: float, band: float = 0.0) -> go.Figure:
    lo, hi = max(0.0, threshold - band), min(1.0, threshold + band)
    steps = [dict(range=[0, lo], color="#e3f0fb"), dict(range=[hi, 1], color="#fbe3e3")]
    if band > 0:
        steps.append(dict(range=[lo, hi], color="#fdf0cc"))
    fig = go.Figure(go.Indicator(
        mode="gauge+number", value=probability * 100, number=dict(suffix="%", valueformat=".1f"),
        title=dict(text="P(pneumonia)"),
        gauge=dict(axis=dict(range=[0, 100]), bar=dict(color="#333333", thickness=0.3), steps=[
            dict(range=[s["range"][0] * 100, s["range"][1] * 100], color=s["color"]) for s in steps],
            threshold=dict(line=dict(color=RED, width=4), thickness=0.9, value=threshold * 100)),
    ))
    fig.update_layout(height=240, margin=dict(l=35, r=35, t=50, b=10))
    return fig


def side_by_side_figure(original_rgb: np.ndarray, overlay_rgb: np.ndarray, titles=("X-ray", "Where the model looked")) -> go.Figure:
    """Two images with linked zoom and pan (drag to zoom, double-click to reset)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.02, shared_xaxes=True, shared_yaxes=True)
    fig.add_trace(go.Image(z=original_rgb, hoverinfo="skip"), 1, 1)
    fig.add_trace(go.Image(z=overlay_rgb, hoverinfo="skip"), 1, 2)
    h, w = original_rgb.shape[:2]
    fig.update_xaxes(showticklabels=False, matches="x")
    fig.update_yaxes(showticklabels=False, matches="y", scaleanchor="x")
    fig.update_layout(height=min(620, int(420 * h / max(w, 1)) + 60), margin=dict(l=0, r=0, t=30, b=0), dragmode="zoom")
    return fig
