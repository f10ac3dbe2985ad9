"""A small HTTP API beside the dashboard, for scripts and other services (FastAPI; OpenAPI docs at ``/docs``).

    uv run uvicorn api:app --port 8000

    GET  /health        -> model name, weights sha256, threshold, calibrated prevalence, default band, gate present,
                           limits, disclaimer
    POST /predict[?threshold=&band=&cam=gradcam&opacity=&force=&exports=]
         body: the image file itself (any format the app accepts), or multipart/form-data with one field "file"
         -> {"probability", "decision", "input_check", "reliable", "threshold", "band", "model", ...
             [+ "overlay_png_base64"] [+ "export_stability": P per re-export, max change, stable]}
    POST /predict/batch[?threshold=&band=&force=]
         body: multipart/form-data with up to MAX_BATCH_FILES fields named "files"
         -> {"results": [one entry per file, in upload order, each a prediction or {"error": ...}], ...}

Decisions come from ``model.decision`` (the same function and default band as the app). When the input
gate flags an image (not a frontal chest film the model can read), the decision is ``NOT_ASSESSED`` and the
probability is withheld; ``force=true`` returns the model's output anyway, marked ``"reliable": false``.

Errors are always JSON ``{"error": "<human message>"}``: 400 for bad input or bad query parameters, 413 for
a body over the caps, 503 when the model cannot be loaded (details go to the server log, not the client).

Size caps and memory: a single upload may be at most ``MAX_FILE_BYTES`` (the app's limit); a batch at most
``MAX_BATCH_FILES`` files of that size and ``MAX_BATCH_BYTES`` in all. An oversized request is refused with
413 *before its body is read*: at once from its Content-Length header, or, for a chunked body without one, as
soon as the running count passes the cap while streaming.

Nothing is written to disk: the request body is streamed into memory by this module (never through
Starlette's ``request.form()``, which spools uploads over 1 MB to a temporary file) and multipart bodies are
parsed in memory, chunk by chunk, with ``python-multipart``'s callback parser. The images are decoded from
those bytes in memory and dropped when the response is sent (tested by watching the process's open files).

Research/education use only; not a medical device.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import model
from model.decision import DEFAULT_BAND, DISCLAIMER, NOT_ASSESSED, decide
from model.preprocessing import MAX_FILE_BYTES

MULTIPART_OVERHEAD = 1 << 20  # room for boundaries, part headers and small text fields around one file
MAX_BATCH_FILES = 32
MAX_BATCH_BYTES = 256 * 1024 * 1024
PREDICT_CHUNK = 8  # images decoded and scored together in a batch (bounds peak memory)
CAM_NAMES = tuple(model.CAM_METHODS)  # gradcam, gradcam++, eigencam, layercam
UNRELIABLE = "The input check flagged this image; the model's output is returned because force=true, and is unreliable."

log = logging.getLogger("cxr.api")


@lru_cache(maxsize=1)
def classifier() -> model.Classifier:
    return model.load_model()


# ------------------------------------------------------------------------------------------------
# response models (for /docs; the handlers return plain dicts of this shape)
# ------------------------------------------------------------------------------------------------


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, in a sentence for a person.",
                       examples=["The file is not a recognised image (JPEG, PNG, BMP, TIFF or DICOM)."])


class InputCheckModel(BaseModel):
    flagged: bool = Field(description="True: not an image this model can read (e.g. not a frontal chest film).")
    score: float = Field(description="Out-of-distribution score; higher = less like the training films.")
    reason: str | None = Field(None, description="A sentence for the user when flagged (or a caution), else null.")


class ExportStabilityModel(BaseModel):
    probability: float = Field(description="P(pneumonia) of the copy the re-exports are made of (fitted within 1024 px).")
    scores: dict[str, float] = Field(description="P(pneumonia) per re-export, by name (see model/exports.py).")
    max_change: float = Field(description="Largest |change in P| over the re-exports.")
    changed_decisions: list[str] = Field(description="Re-exports whose decision differs at this threshold and band.")
    stable: bool = Field(description=f"True when max_change <= {model.STABLE_CHANGE} and no decision changes.")
    skipped: dict[str, str] = Field(default_factory=dict, description="Re-exports not made of this image, and why.")


class PredictResponse(BaseModel):
    probability: float | None = Field(description="Calibrated P(pneumonia); null when the input check flagged the "
                                                  "image and force=true was not given.", examples=[0.93])
    decision: Literal["PNEUMONIA", "NORMAL", "UNCERTAIN", "NOT_ASSESSED"]
    input_check: InputCheckModel
    reliable: bool = Field(description="False when the input check flagged the image.")
    forced: bool = Field(description="True when force=true was given.")
    warning: str | None = Field(None, description="Set when a flagged image was scored because of force=true.")
    threshold: float
    band: float
    image_size: list[int] = Field(description="Decoded image [width, height] in pixels.", examples=[[1024, 1024]])
    model: str
    weights_sha256: str
    disclaimer: str
    overlay_png_base64: str | None = Field(None, description="Heatmap overlay (PNG, base64) when cam= was given.")
    cam_method: str | None = None
    export_stability: ExportStabilityModel | None = Field(
        None, description=f"With exports=true: the image re-scored as {len(model.EXPORTS)} other exports would have made it.")


class BatchItem(BaseModel):
    index: int = Field(description="Position of the file in the upload (0-based).")
    file: str | None = Field(description="The file name the client sent, if any.")
    error: str | None = Field(None, description="Why this file got no result (the others are still scored).")
    probability: float | None = None
    decision: Literal["PNEUMONIA", "NORMAL", "UNCERTAIN", "NOT_ASSESSED"] | None = None
    input_check: InputCheckModel | None = None
    reliable: bool | None = None
    warning: str | None = None
    image_size: list[int] | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem] = Field(description="One entry per uploaded file, in upload order.")
    n_files: int
    n_errors: int
    threshold: float
    band: float
    forced: bool
    model: str
    weights_sha256: str
    disclaimer: str


class HealthResponse(BaseModel):
    status: Literal["ok", "error"]
    model: str | None = None
    architecture: str | None = None
    weights_sha256: str | None = None
    threshold: float | None = Field(None, description="The model's default decision threshold.")
    default_band: float = Field(DEFAULT_BAND, description="Default half-width of the UNCERTAIN band (as in the app).")
    operating_points: dict[str, float] | None = None
    calibrated_prevalence: float | None = Field(
        None, description="Share of pneumonia films the probabilities are calibrated for (null: the model does not say); "
                          "where pneumonia is rarer, the same probability means a lower chance (model.decision.at_prevalence).")
    has_gate: bool | None = Field(None, description="Whether the model carries a fitted input gate.")
    limits: dict[str, int]
    disclaimer: str
    error: str | None = None


LIMITS = {"max_file_bytes": MAX_FILE_BYTES, "max_batch_files": MAX_BATCH_FILES, "max_batch_bytes": MAX_BATCH_BYTES}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad input or query parameters"},
    413: {"model": ErrorResponse, "description": "Body over the size caps (refused before it is read)"},
    503: {"model": ErrorResponse, "description": "The model could not be loaded"},
}

app = FastAPI(
    title="Chest X-ray pneumonia screening API",
    version="1.0",
    description=__doc__.split("\n\n", 2)[2] if __doc__ else None,
)


# ------------------------------------------------------------------------------------------------
# errors: always {"error": "..."}
# ------------------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(err: dict) -> str:
    name = str(err.get("loc", ["?"])[-1])
    kind, ctx, given = err.get("type", ""), err.get("ctx") or {}, err.get("input")
    if kind in ("float_parsing", "float_type", "finite_number"):
        return f"{name} must be a finite number (could not convert {given!r})"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bounds = {"threshold": (0, 1), "band": (0, 0.5), "opacity": (0, 1)}.get(name)
        if bounds:
            return f"{name} must be between {bounds[0]} and {bounds[1]} (got {given})"
        return f"{name}: {err.get('msg', 'out of range')}"
    if kind == "literal_error":
        return f"{name} must be one of {', '.join(CAM_NAMES) if name == 'cam' else ctx.get('expected')} (got {given!r})"
    if kind == "bool_parsing":
        return f"{name} must be true or false (got {given!r})"
    return f"{name}: {err.get('msg', 'invalid value')}"


@app.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error("; ".join(_validation_message(e) for e in exc.errors()) or "invalid request", 400)


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(ApiError)
async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.message, exc.status)


@app.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug, logged
    log.exception("unexpected error on %s", request.url.path)
    return _error("Internal error; the server log has the details.", 500)


def _load_classifier():
    try:
        return classifier()
    except (model.ModelArtifactError, ValueError, OSError) as err:
        log.error("model unavailable: %s", err)  # may name paths: the log is for the operator, not the client
        raise ApiError("The model is unavailable: it could not be loaded on the server (see the server log).", 503) from None


# ------------------------------------------------------------------------------------------------
# reading the body: in memory, capped, before anything else
# ------------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{round(n / 2**20, 1):g} MB"


def _declared_length(request: Request, cap: int) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:
        declared = int(raw)
    except ValueError:
        raise ApiError("Invalid Content-Length header.") from None
    if declared < 0:
        raise ApiError("Invalid Content-Length header.")
    if declared > cap:  # refused from the header alone: not one byte of the body is read
        raise ApiError(f"The request body ({_mb(declared)}) is larger than the limit of {_mb(cap)}.", 413)
    return declared


async def _stream(request: Request, cap: int):
    """Yield the body's chunks, refusing with 413 as soon as more than ``cap`` bytes have arrived."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                raise ApiError(f"The request body is larger than the limit of {_mb(cap)}.", 413)
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise ApiError("The client disconnected before sending the whole body.") from None


@dataclass
class Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)
    oversized: bool = False
    wanted: bool = False


async def read_multipart(request: Request, wanted: str, file_cap: int, total_cap: int, max_files: int,
                         oversized_is_fatal: bool) -> list[Part]:
    """Parse a multipart/form-data body in memory, chunk by chunk, keeping only the parts named ``wanted``.

    Each kept part holds at most ``file_cap`` bytes: beyond that it is marked ``oversized`` and its data is
    dropped (or, with ``oversized_is_fatal``, the request is refused with 413 at once).
    """
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError("multipart/form-data needs a boundary in its Content-Type header.")
    parts: list[Part] = []
    headers: dict[str, bytes] = {}
    current: dict[str, Any] = {"part": None, "field": b"", "value": b"", "ended": False}

    def on_part_begin():
        headers.clear()
        current["part"] = Part()

    def on_header_field(data, start, end):
        current["field"] += data[start:end]

    def on_header_value(data, start, end):
        current["value"] += data[start:end]

    def on_header_end():
        headers[current["field"].decode("latin-1").strip().lower()] = current["value"]
        current["field"], current["value"] = b"", b""

    def on_headers_finished():
        part: Part = current["part"]
        _, disp = parse_options_header(headers.get("content-disposition", b""))
        part.name = disp.get(b"name", b"").decode("utf-8", "replace")
        fname = disp.get(b"filename")
        part.filename = fname.decode("utf-8", "replace") if fname is not None else None
        part.wanted = part.name == wanted
        if part.wanted:
            if sum(p.wanted for p in parts) >= max_files:
                raise ApiError(f"Too many files: at most {max_files} per request"
                               + ("; use /predict/batch for several." if max_files == 1 else "."))
            parts.append(part)

    def on_part_data(data, start, end):
        part: Part = current["part"]
        if not part.wanted or part.oversized:
            return  # other fields are not kept (they still count towards the total cap)
        if len(part.data) + (end - start) > file_cap:
            if oversized_is_fatal:
                raise ApiError(f"The file is larger than the limit of {_mb(file_cap)}.", 413)
            part.oversized, part.data = True, bytearray()
            return
        part.data += data[start:end]

    def on_end():
        current["ended"] = True

    parser = MultipartParser(boundary, callbacks={
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_end": on_end,
    })
    try:
        async for chunk in _stream(request, total_cap):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as err:
        raise ApiError(f"Malformed multipart body: {err}") from None
    if not current["ended"]:
        raise ApiError("Malformed multipart body: it ends before its closing boundary.")
    return parts


async def read_single_upload(request: Request) -> bytes:
    """The image of a /predict request: the raw body, or the multipart field ``file``."""
    is_multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
    cap = MAX_FILE_BYTES + (MULTIPART_OVERHEAD if is_multipart else 0)
    _declared_length(request, cap)
    if is_multipart:
        parts = await read_multipart(request, "file", MAX_FILE_BYTES, cap, max_files=1, oversized_is_fatal=True)
        if not parts:
            raise ApiError("multipart requests need the image in a field named 'file'.")
        return bytes(parts[0].data)
    body = bytearray()
    async for chunk in _stream(request, cap):
        body += chunk
    return bytes(body)


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------


def _decode(data: bytes):
    """DecodedImage: the grey image plus the DICOM tags and colour content the input check reads."""
    try:
        return model.decode(data)
    except model.InvalidImageError as err:
        raise ApiError(str(err)) from None
    except Exception:  # a decoder bug must still give the client an answer, not a 500
        log.exception("decoder failed on an upload")
        raise ApiError("The file could not be decoded as an image.") from None


def _outcome(prob: float, check, threshold: float, band: float, force: bool) -> dict:
    flagged = bool(check.flagged)
    out = {"input_check": check.to_dict(), "reliable": not flagged}
    if flagged and not force:
        out.update(probability=None, decision=decide(prob, threshold, band, flagged=True))
        assert out["decision"] == NOT_ASSESSED
    else:
        out.update(probability=float(prob), decision=decide(prob, threshold, band))
        if flagged:
            out["warning"] = UNRELIABLE
    return out


Threshold = Annotated[float | None, Query(
    ge=0.0, le=1.0, allow_inf_nan=False, examples=[0.5],
    description="Decision threshold on P(pneumonia); default: the model's own (see /health).")]
Band = Annotated[float, Query(
    ge=0.0, le=0.5, allow_inf_nan=False, examples=[DEFAULT_BAND],
    description="Half-width of the UNCERTAIN band around the threshold (0 = none); default as in the app.")]
Force = Annotated[bool, Query(
    description="Score images the input check flagged anyway; the result is then marked unreliable.")]


@app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
def health() -> Any:
    """Is the model loaded? Which one, with which defaults and limits."""
    base = {"default_band": DEFAULT_BAND, "limits": LIMITS, "disclaimer": DISCLAIMER}
    try:
        clf = _load_classifier()
    except ApiError as err:
        return JSONResponse({"status": "error", "error": err.message, **base}, status_code=err.status)
    return {"status": "ok", "model": clf.name, "architecture": clf.meta.architecture,
            "weights_sha256": clf.meta.weights_sha256, "threshold": clf.threshold,
            "operating_points": clf.meta.operating_points, "calibrated_prevalence": clf.meta.prevalence, "has_gate": bool(getattr(clf, "has_gate", False)), **base}


_SINGLE_BODY = {"requestBody": {"required": True, "description": f"One image, at most {_mb(MAX_FILE_BYTES)}.", "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "the image"}}}},
}}}
_BATCH_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"], "properties": {"files": {
        "type": "array", "items": {"type": "string", "format": "binary"}, "maxItems": MAX_BATCH_FILES,
        "description": f"up to {MAX_BATCH_FILES} images, each at most {_mb(MAX_FILE_BYTES)}, "
                       f"{_mb(MAX_BATCH_BYTES)} in all"}}}}}}}


@app.post("/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=ERRORS,
          openapi_extra=_SINGLE_BODY)
async def predict(
    request: Request,
    threshold: Threshold = None,
    band: Band = DEFAULT_BAND,
    cam: Annotated[Literal["gradcam", "gradcam++", "eigencam", "layercam"] | None, Query(
        description="Also return a heatmap overlay made with this CAM method.", examples=["gradcam"])] = None,
    opacity: Annotated[float, Query(ge=0.0, le=1.0, allow_inf_nan=False, description="Heatmap opacity in the overlay.",
                                    examples=[0.45])] = 0.45,
    force: Force = False,
    exports: Annotated[bool, Query(description=f"Also re-score the image as {len(model.EXPORTS)} other exports would have made it (a softer "
                                               "device, gamma, JPEG, sharpening, ...) and say how far P moves.")] = False,
) -> Any:
    """Score one image: the raw file as the body, or multipart/form-data with the field `file`."""
    is_multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
    _declared_length(request, MAX_FILE_BYTES + (MULTIPART_OVERHEAD if is_multipart else 0))  # 413 before anything
    clf = _load_classifier()
    data = await read_single_upload(request)
    t = clf.threshold if threshold is None else threshold

    def work() -> dict:
        from model.results import png_bytes

        decoded = _decode(data)
        gray = decoded.gray
        out: dict = {}
        if cam:
            analysis = clf.analyze(decoded, method=cam)
            prob, check = analysis.probability, analysis.check
            if not check.flagged or force:
                rgb = model.overlay(gray, analysis.heatmap, opacity)
                out["overlay_png_base64"] = base64.b64encode(png_bytes(rgb)).decode()
            out["cam_method"] = cam
        else:
            pred = clf.predict([decoded])[0]
            prob, check = pred.probability, pred.check
        if exports and (not check.flagged or force):
            moved = model.export_stability(clf, gray)
            out["export_stability"] = {"probability": moved.probability, "scores": moved.scores, "max_change": moved.max_change,
                                       "changed_decisions": moved.changed_decisions(t, band), "stable": moved.stable(t, band),
                                       "skipped": moved.skipped}
        return {**_outcome(prob, check, t, band, force), "forced": force, "threshold": t, "band": band,
                "image_size": [int(gray.shape[1]), int(gray.shape[0])], "model": clf.name,
                "weights_sha256": clf.meta.weights_sha256, "disclaimer": DISCLAIMER, **out}

    return JSONResponse(await run_in_threadpool(work))


@app.post("/predict/batch", response_model=BatchResponse, responses=ERRORS, openapi_extra=_BATCH_BODY)
async def predict_batch(request: Request, threshold: Threshold = None, band: Band = DEFAULT_BAND,
                        force: Force = False) -> Any:
    """Score several images sent as multipart/form-data fields named `files`: one result per file, in order.

    A file that cannot be read (or is over the per-file cap) gets an `error` in its entry; the others are
    still scored.
    """
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError("Send the images as multipart/form-data, each in a field named 'files'.")
    _declared_length(request, MAX_BATCH_BYTES)
    clf = _load_classifier()
    parts = await read_multipart(request, "files", MAX_FILE_BYTES, MAX_BATCH_BYTES, MAX_BATCH_FILES,
                                 oversized_is_fatal=False)
    if not parts:
        raise ApiError("No files: send the images in multipart fields named 'files'.")
    t = clf.threshold if threshold is None else threshold

    def work() -> list[dict]:
        results: list[dict] = []
        for start in range(0, len(parts), PREDICT_CHUNK):
            chunk = parts[start:start + PREDICT_CHUNK]
            grays, entries = [], []
            for i, part in enumerate(chunk, start=start):
                entry: dict = {"index": i, "file": part.filename}
                entries.append(entry)
                if part.oversized:
                    entry["error"] = f"The file is larger than the limit of {_mb(MAX_FILE_BYTES)}."
                    continue
                try:
                    decoded = _decode(bytes(part.data))
                    gray = decoded.gray
                except ApiError as err:
                    entry["error"] = err.message
                    continue
                finally:
                    part.data = bytearray()  # the raw bytes are no longer needed
                entry["image_size"] = [int(gray.shape[1]), int(gray.shape[0])]
                grays.append((entry, decoded))
            if grays:
                preds = clf.predict([g for _, g in grays])
                for (entry, _), pred in zip(grays, preds):
                    entry.update(_outcome(pred.probability, pred.check, t, band, force))
            results.extend(entries)
        return results

    results = await run_in_threadpool(work)
    return {"results": results, "n_files": len(results), "n_errors": sum("error" in r for r in results),
            "threshold": t, "band": band, "forced": force, "model": clf.name,
            "weights_sha256": clf.meta.weights_sha256, "disclaimer": DISCLAIMER}
