"""Turning uploads into results and downloadable records; everything stays in memory."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .classifier import Classifier
from .decision import DISCLAIMER, decide
from .gate import UNCHECKED, InputCheck
from .preprocessing import InvalidImageError, decode, resize_square

RECORD_FIELDS = ["file", "sha256", "image_width", "image_height", "probability", "threshold", "uncertain_band", "decision",
                 "input_flagged", "input_check_reason", "input_check_score", "model", "model_sha256", "time_utc", "error"]
# the DICOM tags shown beside the image: technical only, never patient or institution identifiers
DICOM_TAGS = {"Modality": "modality", "BodyPartExamined": "body part", "ViewPosition": "view",
              "PhotometricInterpretation": "photometric interpretation"}

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
    check: InputCheck = UNCHECKED  # the input gate's verdict, from the same forward pass as the probability
    dicom: dict = field(default_factory=dict)  # technical DICOM tags (DICOM_TAGS) when the upload is DICOM
    format: str | None = None
    display_uri: str | None = None  # the display copy as sent to the browser (set by the page, once)
    heatmap: np.ndarray | None = None  # the default heatmap of ``square`` (float16 S x S), from the scoring pass

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def flagged(self) -> bool:
        return self.ok and bool(self.check.flagged)


def friendly_error(message: str) -> str:
    """The decoder's message plus what the user can do about it (no library internals)."""
    m = message.lower()
    if any(s in m for s in ("gdcm", "pylibjpeg", "pixel data could not be decoded", "transfer syntax")):
        return ("The DICOM image uses a compression this app cannot decode. Export it uncompressed "
                "(or as PNG/JPEG) from your viewer and upload that.")
    if "truncated" in m or "corrupt" in m:
        return f"{message} Upload the file again, or re-export it from its source."
    if "not a recognised image" in m:
        return f"{message} Upload a chest X-ray as JPEG, PNG or DICOM."
    if "too large" in m or "larger than" in m:
        return f"{message} Downscale the image (2000-3000 px is plenty) and upload it again."
    if "too small" in m or "at least" in m:
        return f"{message} Upload the original, full-size X-ray."
    return message


def score_uploads(clf: Classifier, files: list[tuple[str, bytes]], progress=None, batch_size: int = 16) -> list[UploadResult]:
    """Decode and score many uploads; a bad file becomes a result with ``error`` set, never an exception.

    The probability, the input check and the default heatmap come from one ``clf.predict`` pass. ``progress(done, total)``
    is called as work completes (for a progress bar).
    """
    results = [UploadResult(name, hashlib.sha256(data).hexdigest()) for name, data in files]
    good: list[int] = []
    sources: dict[int, object] = {}
    for i, (_, data) in enumerate(files):
        r = results[i]
        try:
            decoded = decode(data)
            gray, r.dicom, r.format = decoded.gray, dict(decoded.dicom), decoded.format
        except InvalidImageError as err:
            r.error = friendly_error(str(err))
        else:
            r.size = (gray.shape[1], gray.shape[0])
            r.square = resize_square(gray, clf.meta.input_size)
            r.display = fit_within(gray, DISPLAY_SIDE)
            r.thumbnail = thumbnail_data_uri(r.display)
            sources[i] = decoded if decoded is not None else r.square
            good.append(i)
        if progress:
            progress(i + 1, 2 * len(files))
    for start in range(0, len(good), batch_size):
        chunk = good[start : start + batch_size]
        preds = clf.predict([sources[i] for i in chunk], heatmaps=True)
        for i, p in zip(chunk, preds):
            results[i].probability = float(p.probability)
            results[i].check = p.check
            results[i].heatmap = None if p.heatmap is None else p.heatmap.astype(np.float16)
        if progress:
            progress(len(files) + start + len(chunk), 2 * len(files))
    if progress:
        progress(1, 1)
    return results


def result_decision(result: UploadResult, threshold: float, band: float) -> str:
    if not result.ok:
        return "ERROR"
    return decide(result.probability, threshold, band, flagged=result.flagged)


def record(result: UploadResult, clf: Classifier, threshold: float, band: float) -> dict:
    check = result.check if result.ok else None
    return {
        "file": result.name,
        "sha256": result.sha256,
        "image_width": result.size[0] if result.size else None,
        "image_height": result.size[1] if result.size else None,
        "probability": None if result.probability is None else round(result.probability, 6),
        "threshold": round(threshold, 6),
        "uncertain_band": round(band, 6),
        "decision": result_decision(result, threshold, band),
        "input_flagged": None if check is None else bool(check.flagged),
        "input_check_reason": "" if check is None else (check.reason or ""),
        "input_check_score": None if check is None else round(float(check.score), 6),
        "model": clf.name,
        "model_sha256": clf.meta.weights_sha256,
        "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "error": result.error or "",
    }


def json_record(rec: dict, result: UploadResult | None = None) -> dict:
    """The JSON form of a record: the input check as one object and the disclaimer (as the API returns them), DICOM
    tags when present."""
    out = {k: v for k, v in rec.items() if not k.startswith("input_")}
    if rec.get("input_flagged") is not None:
        out["input_check"] = {"flagged": rec["input_flagged"], "score": rec["input_check_score"],
                              "reason": rec["input_check_reason"] or None}
    if result is not None and result.dicom:
        out["dicom"] = dict(result.dicom)
    out["disclaimer"] = DISCLAIMER
    return out


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
    return "data:image/png;base64," + base64.b64encode(png_bytes(fit_within(gray, side))).decode()
