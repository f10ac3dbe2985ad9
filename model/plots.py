"""The Diagnose page's two figures (gauge, X-ray beside its heatmap).

Transitional: the report charts moved to ``ui/charts.py``; these two move to ``ui/viewer.py`` with the
Diagnose page, after which this module is deleted.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

RED = "#d62728"


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
