"""Turning uploads into results and downloadable records; everything stays in memory."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .classifier import Classifier
from .preprocessing import InvalidImageError, decode_image
from .report import decide

RECORD_FIELDS = ["file", "sha256", "probability", "threshold", "uncertain_band", "decision", "model", "model_sha256", "time_utc", "error"]


@dataclass(eq=False)
class UploadResult:
    name: str
    sha256: str
    probability: float | None = None
    image: np.ndarray | None = None  # decoded uint8 grayscale, full resolution
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def score_uploads(clf: Classifier, files: list[tuple[str, bytes]], progress=None, batch_size: int = 16) -> list[UploadResult]:
    """Decode and score many uploads; a bad file becomes a result with ``error`` set, never an exception.

    ``progress(done, total)`` is called as work completes (for a progress bar).
    """
    results = [UploadResult(name, hashlib.sha256(data).hexdigest()) for name, data in files]
    good: list[int] = []
    for i, (_, data) in enumerate(files):
        try:
            results[i].image = decode_image(data)
            good.append(i)
        except InvalidImageError as err:
            results[i].error = str(err)
        if progress:
            progress(i + 1, 2 * len(files))
    for start in range(0, len(good), batch_size):
        chunk = good[start : start + batch_size]
        probs = clf.predict_proba([results[i].image for i in chunk])
        for i, p in zip(chunk, probs):
            results[i].probability = float(p)
        if progress:
            progress(len(files) + start + len(chunk), 2 * len(files))
    if progress:
        progress(1, 1)
    return results


def record(result: UploadResult, clf: Classifier, threshold: float, band: float) -> dict:
    return {
        "file": result.name,
        "sha256": result.sha256,
        "probability": None if result.probability is None else round(result.probability, 6),
        "threshold": round(threshold, 6),
        "uncertain_band": round(band, 6),
        "decision": decide(result.probability, threshold, band) if result.ok else "ERROR",
        "model": clf.name,
        "model_sha256": clf.meta.weights_sha256,
        "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "error": result.error or "",
    }


def records_csv(records: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RECORD_FIELDS)
    w.writeheader()
    w.writerows(records)
    return buf.getvalue().encode()


def records_json(records: list[dict] | dict) -> bytes:
    return (json.dumps(records, indent=2) + "\n").encode()


def fit_within(gray_or_rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (keeping aspect) so the longer side is at most ``max_side`` - for display only."""
    h, w = gray_or_rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return gray_or_rgb
    im = Image.fromarray(gray_or_rgb)
    return np.asarray(im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))


def to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2) if gray.ndim == 2 else gray


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def thumbnail_data_uri(gray: np.ndarray, side: int = 72) -> str:
    buf = io.BytesIO()
    Image.fromarray(fit_within(gray, side)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
