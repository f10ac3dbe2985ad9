"""Plotly figures for the Model report page: pure functions of a report (or a training history) and a threshold.

Plots are presentation, not the model: they live with the UI (moved here from ``model/plots.py``).
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from model.report import EvaluationReport

BLUE, RED, GREEN, AMBER, GREY = "#1f77b4", "#d62728", "#2ca02c", "#f0a202", "#7f7f7f"
HEIGHT = 380
# top margin leaves a strip for Plotly's mode bar above the title, so the toolbar never covers it
_LAYOUT = dict(margin=dict(l=10, r=10, t=70, b=10), template="plotly_white", height=HEIGHT,
               title=dict(x=0.01, xanchor="left", y=0.9, yanchor="top", yref="container"))
# what st.plotly_chart gets as ``config``: a smaller toolbar (no lasso/select tools that do nothing here)
PLOTLY_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"]}


def _layout(fig: go.Figure, title: str, **kwargs) -> go.Figure:
    fig.update_layout(**_LAYOUT)
    fig.update_layout(title_text=title, **kwargs)
    return fig


def _marker(x: float, y: float, text: str) -> go.Scatter:
    """The current-threshold marker, its label placed on the side with room (never cut off at an edge)."""
    horizontal = "left" if x > 0.6 else "right"
    vertical = "top" if y < 0.25 else "bottom"
    return go.Scatter(x=[x], y=[y], mode="markers+text", text=[text], textposition=f"{vertical} {horizontal}",
                      textfont=dict(size=13), cliponaxis=False,
                      marker=dict(size=13, color=RED, symbol="x"), name="current threshold")


def roc_figure(report: EvaluationReport, threshold: float) -> go.Figure:
    roc, m = report.roc, report.at(threshold)
    ci = report.auc_ci
    auc_txt = f"AUC {report.auc:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color=GREY), name="chance"))
    fig.add_trace(go.Scatter(x=roc["fpr"], y=roc["tpr"], mode="lines", line=dict(color=BLUE, width=2.5), name=auc_txt,
                             customdata=roc["thresholds"],
                             hovertemplate="FPR %{x:.3f}<br>TPR %{y:.3f}<br>threshold %{customdata:.3f}<extra></extra>"))
    fig.add_trace(_marker(1 - m["specificity"], m["sensitivity"], f"t={threshold:.3f}"))
    _layout(fig, f"ROC curve - {auc_txt}", xaxis_title="1 - specificity (false-positive rate)",
            yaxis_title="sensitivity (true-positive rate)", legend=dict(x=0.98, xanchor="right", y=0.05))
    fig.update_xaxes(range=[-0.02, 1.02])
    fig.update_yaxes(range=[-0.02, 1.02])
    return fig


def pr_figure(report: EvaluationReport, threshold: float) -> go.Figure:
    pr, m = report.pr, report.at(threshold)
    prevalence = report.y.mean()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[prevalence, prevalence], mode="lines", line=dict(dash="dash", color=GREY),
                             name=f"prevalence {prevalence:.2f}"))
    fig.add_trace(go.Scatter(x=pr["recall"], y=pr["precision"], mode="lines", line=dict(color=BLUE, width=2.5),
                             name="precision-recall"))
    fig.add_trace(_marker(m["sensitivity"], m["ppv"], f"t={threshold:.3f}"))
    _layout(fig, "Precision-recall curve", xaxis_title="recall (sensitivity)", yaxis_title="precision (PPV)",
            legend=dict(x=0.02, y=0.05))
    fig.update_xaxes(range=[-0.02, 1.02])
    fig.update_yaxes(range=[-0.02, 1.05])
    return fig


def confusion_figure(metrics: dict, class_names=("NORMAL", "PNEUMONIA")) -> go.Figure:
    cm = metrics["confusion_matrix"]
    counts = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    text = [[f"{counts[i, j]}<br>{rates[i, j]:.1%} of {class_names[i].lower()}" for j in range(2)] for i in range(2)]
    fig = go.Figure(go.Heatmap(z=rates, x=[f"predicted {c}" for c in class_names], y=[f"actual {c}" for c in class_names],
                               text=text, texttemplate="%{text}", textfont=dict(size=16), colorscale="Blues",
                               zmin=0, zmax=1, showscale=False, hoverinfo="skip"))
    _layout(fig, f"Confusion matrix at threshold {metrics['threshold']:.3f}")
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
    anchor = "left" if threshold > 0.5 else "right"  # the label on the side with room
    fig.add_vline(x=threshold, line=dict(color="black", width=2, dash="dash"), annotation_text=f"threshold {threshold:.3f}",
                  annotation_position=f"top {anchor}")
    _layout(fig, "Score distribution by true class" + (" (shaded: uncertain band)" if band > 0 else ""),
            xaxis_title="P(pneumonia)", yaxis_title="images (log scale)", barmode="overlay",
            legend=dict(x=0.5, xanchor="center", y=0.98))
    # one label per power of ten: the default log ticks (1, 2, 5, 10, 20, 50...) collide on a 380 px chart
    fig.update_yaxes(type="log", dtick=1, tickformat="d", minor=dict(ticks="inside", ticklen=3, showgrid=False))
    fig.update_xaxes(range=[0, 1])
    return fig


def reliability_figure(report: EvaluationReport) -> go.Figure:
    """Observed vs predicted per bin, both score versions; the calibrated bins' film counts as grey bars
    on a second axis (and in the hover), the legend under the plot where it covers nothing."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    cal = report.reliability_calibrated
    edges = np.asarray(cal.get("edges", np.linspace(0, 1, len(cal["count"]) + 1)), dtype=float)
    centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig.add_trace(go.Bar(x=centers, y=cal["count"], width=widths * 0.9, name="films per bin (calibrated)",
                         marker=dict(color="rgba(127,127,127,0.18)"), text=[str(c) if c else "" for c in cal["count"]],
                         textposition="outside", textfont=dict(color=GREY, size=11), cliponaxis=False,
                         hovertemplate="%{y} films with predicted P in this bin<extra></extra>"), secondary_y=True)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color=GREY), name="perfect calibration"))
    for rel, name, color, dash in ((report.reliability_uncalibrated, "raw softmax", GREY, "dot"),
                                   (cal, "calibrated", BLUE, "solid")):
        pts = [(x, y, n) for x, y, n in zip(rel["mean_predicted"], rel["fraction_positive"], rel["count"]) if n]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                 line=dict(color=color, dash=dash), name=f"{name} (ECE {rel['ece']:.3f})",
                                 customdata=[p[2] for p in pts],
                                 hovertemplate="predicted %{x:.2f}<br>observed %{y:.2f}<br>n=%{customdata}<extra></extra>"))
    _layout(fig, "Reliability diagram", height=HEIGHT + 40,
            legend=dict(orientation="h", x=0, y=-0.18, yanchor="top"), margin=dict(l=10, r=10, t=70, b=10))
    fig.update_xaxes(title_text="mean predicted P(pneumonia)", range=[-0.01, 1.01])
    fig.update_yaxes(title_text="observed fraction with pneumonia", range=[-0.02, 1.05], secondary_y=False)
    top = max(cal["count"]) if len(cal["count"]) else 1
    fig.update_yaxes(title_text="films per bin", secondary_y=True, showgrid=False, range=[0, top * 3.2],
                     tickfont=dict(color=GREY), title_font=dict(color=GREY))
    return fig


def training_curves_figure(history: list[dict], best_epoch: int | None = None) -> go.Figure:
    """Loss (left) and validation AUC (right) per epoch: one colour per quantity, dotted for EMA weights,
    integer epoch ticks, legend grouped by panel."""
    epochs = [h["epoch"] for h in history]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "validation AUC"), horizontal_spacing=0.08)
    loss = dict(legendgroup="loss", legendgrouptitle_text="loss")
    auc = dict(legendgroup="auc", legendgrouptitle_text="validation AUC")
    fig.add_trace(go.Scatter(x=epochs, y=[h.get("train_loss") for h in history], name="train loss", mode="lines+markers",
                             line=dict(color=BLUE), marker=dict(symbol="circle"), **loss), 1, 1)
    fig.add_trace(go.Scatter(x=epochs, y=[h.get("val_loss") for h in history], name="val loss", mode="lines+markers",
                             line=dict(color=RED, dash="dash"), marker=dict(symbol="square"), **loss), 1, 1)
    fig.add_trace(go.Scatter(x=epochs, y=[h.get("val_auc") for h in history], name="val AUC", mode="lines+markers",
                             line=dict(color=GREEN), marker=dict(symbol="diamond"), **auc), 1, 2)
    if history and "val_auc_ema" in history[0]:
        fig.add_trace(go.Scatter(x=epochs, y=[h.get("val_auc_ema") for h in history], name="val AUC (EMA weights)",
                                 mode="lines+markers", line=dict(color=GREEN, dash="dot"), marker=dict(symbol="diamond-open"),
                                 **auc), 1, 2)
    if best_epoch is not None:  # the epoch whose weights were kept
        fig.add_vline(x=best_epoch, line=dict(color=GREY, dash="dot"), annotation_text=f"kept: epoch {best_epoch}",
                      annotation_position="bottom left", row=1, col=2)
    step = max(1, math.ceil(len(epochs) / 12))
    fig.update_xaxes(title_text="epoch", tickmode="linear", tick0=min(epochs) if epochs else 1, dtick=step, tickformat="d")
    fig.update_layout(**_LAYOUT)
    fig.update_layout(margin=dict(l=10, r=10, t=40, b=10), title_text=None, legend=dict(groupclick="toggleitem"))
    return fig
