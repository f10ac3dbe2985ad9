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
from .preprocessing import InvalidImageError, decode_image, resize_square
from .report import decide

RECORD_FIELDS = ["file", "sha256", "image_width", "image_height", "probability", "threshold", "uncertain_band", "decision", "model", "model_sha256", "time_utc", "error"]


DISPLAY_SIDE = 1024


@dataclass(eq=False)
class UploadResult:
    """What a session keeps per upload: small, derived arrays only (the decoded original is dropped)."""

    name: str
    sha256: str
    probability: float | None = None
    square: np.ndarray | None = None  # the exact model input (uint8 S x S): CAMs use it, so they match the score
    display: np.ndarray | None = None  # uint8 grayscale, longer side <= DISPLAY_SIDE, aspect kept
    thumbnail: str | None = None  # PNG data URI for tables
    size: tuple[int, int] | None = None  # original width, height
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
        r = results[i]
        try:
            gray = decode_image(data)
        except InvalidImageError as err:
            r.error = str(err)
        else:
            r.size = (gray.shape[1], gray.shape[0])
            r.square = resize_square(gray, clf.meta.input_size)
            r.display = fit_within(gray, DISPLAY_SIDE)
            r.thumbnail = thumbnail_data_uri(r.display)
            good.append(i)
        if progress:
            progress(i + 1, 2 * len(files))
    for start in range(0, len(good), batch_size):
        chunk = good[start : start + batch_size]
        probs = clf.predict_proba([results[i].square for i in chunk])
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
        "image_width": result.size[0] if result.size else None,
        "image_height": result.size[1] if result.size else None,
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
