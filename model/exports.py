"""The same film as other devices and exports would have made it: the re-exports the robustness benchmark
measures the model on, and the diagnose page re-scores one film with (one definition for both).

Each takes and returns a uint8 grayscale array; all are deterministic (the noise is seeded by the film's content),
so a film's re-exports, and their scores, are the same every time.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter


def _resize(g: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(g).resize((max(w, 1), max(h, 1)), Image.BILINEAR))


def _levels(g: np.ndarray, f) -> np.ndarray:
    return np.clip(np.round(f(g.astype(np.float64) / 255.0) * 255.0), 0, 255).astype(np.uint8)


def _jpeg(g: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("L"))


def _stretch(g: np.ndarray, lo_q: float = 0.0, hi_q: float = 100.0) -> np.ndarray:
    lo, hi = np.percentile(g, [lo_q, hi_q])
    return _levels(g, lambda x: (x - lo / 255.0) / max((hi - lo) / 255.0, 1e-6))


def _noise(g: np.ndarray, sigma: float) -> np.ndarray:
    rng = np.random.default_rng(int(g[0, :8].sum()))
    return np.clip(g + rng.normal(0, sigma, g.shape), 0, 255).astype(np.uint8)


EXPORTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "down2_up": lambda g: _resize(_resize(g, g.shape[1] // 2, g.shape[0] // 2), g.shape[1], g.shape[0]),
    "gamma_0.8": lambda g: _levels(g, lambda x: x ** 0.8),
    "gamma_1.25": lambda g: _levels(g, lambda x: x ** 1.25),
    "contrast_0.85": lambda g: _levels(g, lambda x: (x - x.mean()) * 0.85 + x.mean()),
    "minmax_stretch": lambda g: _stretch(g),
    "jpeg_60": lambda g: _jpeg(g, 60),
    "window_2pct": lambda g: _stretch(g, 2, 98),
    "blur_1px": lambda g: np.asarray(Image.fromarray(g).filter(ImageFilter.GaussianBlur(1.0))),
    "sharpen": lambda g: np.asarray(Image.fromarray(g).filter(ImageFilter.UnsharpMask(radius=2, percent=80, threshold=0))),
    "noise_3": lambda g: _noise(g, 3.0),
    "original_4x": lambda g: _resize(g, g.shape[1] * 4, g.shape[0] * 4),
}

LABELS = {
    "down2_up": "softer device (2x down- and up-sampled)",
    "gamma_0.8": "gamma 0.8 (brighter mid-tones)",
    "gamma_1.25": "gamma 1.25 (darker mid-tones)",
    "contrast_0.85": "contrast x0.85",
    "minmax_stretch": "min-max stretched",
    "jpeg_60": "JPEG quality 60",
    "window_2pct": "window/level (2nd-98th percentile)",
    "blur_1px": "Gaussian blur 1 px",
    "sharpen": "sharpened (unsharp mask 2 px, 80%)",
    "noise_3": "noise (sigma 3 grey levels)",
    "original_4x": "4x larger original",
}
