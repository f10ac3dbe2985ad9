"""The Diagnose page's figures: the probability gauge and the linked X-ray / heatmap viewer.

Built for the wire, not just for the eye: the X-ray goes to the browser once per panel as a small
JPEG data URI (``go.Image(source=...)``; a raw pixel array makes plotly.js draw one rectangle per
pixel and costs megabytes per upload), and the heatmap is a coarse ``go.Heatmap`` layer
(smoothed by the browser) with its own colour scale, so changing the opacity re-sends a few KB.
The blended overlay PNG is built only when the user downloads it (:func:`overlay_png`).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from model.classifier import overlay
from model.results import fit_within, png_bytes

RED = "#d62728"
DISPLAY_SIDE = 1024  # longest side of the image sent to the browser
HEAT_SIDE = 48  # heatmap grid sent to the browser (today's CAMs are 6 x 6 / 12 x 12 cells upsampled)
JET = [[0.0, "#00007f"], [0.125, "#0000ff"], [0.375, "#00ffff"], [0.625, "#ffff00"], [0.875, "#ff0000"], [1.0, "#7f0000"]]


def jpeg_data_uri(gray_or_rgb: np.ndarray, max_side: int = DISPLAY_SIDE, quality: int = 88) -> str:
    buf = io.BytesIO()
    Image.fromarray(fit_within(gray_or_rgb, max_side)).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def coarse(heat: np.ndarray, side: int = HEAT_SIDE) -> np.ndarray:
    """The heatmap on a grid of at most ``side`` x ``side`` cells (area-averaged), rounded for the wire."""
    heat = np.asarray(heat, dtype=np.float32)
    h, w = heat.shape
    if max(h, w) > side:
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((min(w, side), min(h, side)), Image.BOX), dtype=np.float32)
    return np.round(np.clip(heat, 0.0, 1.0), 3)


def probability_gauge(probability: float, threshold: float, band: float = 0.0) -> go.Figure:
    """P(pneumonia) on the same 0-1 scale (three decimals) as the threshold slider."""
    lo, hi = max(0.0, threshold - band), min(1.0, threshold + band)
    steps = [dict(range=[0, lo], color="#e3f0fb"), dict(range=[hi, 1], color="#fbe3e3")]
    if band > 0:
        steps.append(dict(range=[lo, hi], color="#fdf0cc"))
    fig = go.Figure(go.Indicator(
        mode="gauge+number", value=probability, number=dict(valueformat=".3f"),
        title=dict(text="P(pneumonia)"),
        gauge=dict(axis=dict(range=[0, 1], tickformat=".1f"), bar=dict(color="#333333", thickness=0.3), steps=steps,
                   threshold=dict(line=dict(color=RED, width=4), thickness=0.9, value=threshold)),
    ))
    fig.update_layout(height=240, margin=dict(l=35, r=35, t=50, b=10))
    return fig


def xray_figure(display: np.ndarray, heat: np.ndarray | None = None, opacity: float = 0.45, image_uri: str | None = None,
                titles=("X-ray", "Where the model looked"), revision: str | None = None) -> go.Figure:
    """The X-ray and the same X-ray under the heatmap, with linked zoom and pan.

    Both panels keep the image's aspect (each y axis is scale-anchored to its own x axis) and
    share one region (the second panel's axes match the first's); the initial ranges are the image
    bounds, so a double-click resets both panels to the whole image. ``revision`` (e.g. the image's
    hash) keeps the user's zoom while only the opacity or method changes, and drops it for a new image.
    """
    h, w = display.shape[:2]
    uri = image_uri or jpeg_data_uri(display)
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.02)
    for col in (1, 2):
        fig.add_trace(go.Image(source=uri, hoverinfo="skip", name="X-ray"), 1, col)
    if heat is not None:
        z = coarse(heat)
        gh, gw = z.shape
        dx, dy = w / gw, h / gh
        fig.add_trace(go.Heatmap(
            z=z, x0=dx / 2 - 0.5, dx=dx, y0=dy / 2 - 0.5, dy=dy, zmin=0, zmax=1, colorscale=JET, opacity=opacity,
            zsmooth="best", hoverinfo="skip", name="heatmap",
            colorbar=dict(title=dict(text="influence", side="right"), thickness=12, len=0.85, tickvals=[0, 0.5, 1],
                          ticktext=["low", "", "high"], x=1.0, xpad=4),
        ), 1, 2)
    xr, yr = [-0.5, w - 0.5], [h - 0.5, -0.5]  # image convention: row 0 at the top
    axis = dict(showticklabels=False, showgrid=False, zeroline=False, constrain="domain", autorange=False)
    fig.update_layout(
        xaxis=dict(range=xr, **axis), yaxis=dict(range=yr, scaleanchor="x", scaleratio=1, **axis),
        xaxis2=dict(range=xr, matches="x", **axis), yaxis2=dict(range=yr, matches="y", scaleanchor="x2", scaleratio=1, **axis),
        height=min(620, int(420 * h / max(w, 1)) + 60), margin=dict(l=0, r=0, t=30, b=0), dragmode="zoom",
        plot_bgcolor="white", uirevision=revision or f"{w}x{h}",
    )
    return fig


def overlay_png(gray: np.ndarray, heat: np.ndarray, opacity: float = 0.45) -> bytes:
    return png_bytes(overlay(gray, heat, opacity))
