"""A small HTTP API beside the dashboard, for scripts and other services.

    uv run uvicorn api:app --port 8000

    GET  /health                      -> {"status": "ok", "model": ..., "weights_sha256": ...}
    POST /predict[?threshold=&band=&cam=gradcam&opacity=]
         body: the image file itself (any format the app accepts), or multipart form field "file"
         -> {"probability", "decision", "threshold", "band", "model", ...  [+ "overlay_png_base64"]}

Bad input -> 400 with {"error": "<human message>"}; nothing is written to disk.
Research/education use only; not a medical device.
"""

from __future__ import annotations

import base64
from functools import lru_cache

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import model
from model.preprocessing import MAX_FILE_BYTES
from model.report import decide
from model.results import png_bytes

DISCLAIMER = "Research/education tool, not a medical device."


@lru_cache(maxsize=1)
def classifier() -> model.Classifier:
    return model.load_model()


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _float(request: Request, name: str, default: float, lo: float = 0.0, hi: float = 1.0) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = float(raw)  # ValueError -> 400 below
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}")
    return value


async def health(request: Request) -> JSONResponse:
    try:
        clf = classifier()
    except (model.ModelArtifactError, ValueError, OSError) as err:
        return JSONResponse({"status": "error", "error": str(err)}, status_code=503)
    return JSONResponse({"status": "ok", "model": clf.name, "architecture": clf.meta.architecture,
                         "weights_sha256": clf.meta.weights_sha256, "threshold": clf.threshold,
                         "operating_points": clf.meta.operating_points, "disclaimer": DISCLAIMER})


async def _read_upload(request: Request) -> bytes:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ValueError("multipart requests need the image in a field named 'file'")
        return await upload.read()
    declared = int(request.headers.get("content-length") or 0)
    if declared > MAX_FILE_BYTES:
        raise OverflowError
    body = await request.body()
    if len(body) > MAX_FILE_BYTES:
        raise OverflowError
    return body


async def predict(request: Request) -> JSONResponse:
    try:
        clf = classifier()
    except (model.ModelArtifactError, ValueError, OSError) as err:
        return _error(f"model unavailable: {err}", 503)
    try:
        threshold = _float(request, "threshold", clf.threshold)
        band = _float(request, "band", 0.0, 0.0, 0.5)
        opacity = _float(request, "opacity", 0.45)
        cam = request.query_params.get("cam")
        if cam is not None and cam not in model.CAM_METHODS:
            raise ValueError(f"cam must be one of {', '.join(model.CAM_METHODS)}")
        data = await _read_upload(request)
    except OverflowError:
        return _error(f"file larger than {MAX_FILE_BYTES // 2**20} MB", 413)
    except ValueError as err:
        return _error(str(err))

    def work() -> dict:
        gray = model.decode_image(data)
        out: dict = {}
        if cam:
            analysis = clf.analyze(gray, method=cam)
            prob = analysis.probability
            out["overlay_png_base64"] = base64.b64encode(png_bytes(model.overlay(gray, analysis.heatmap, opacity))).decode()
            out["cam_method"] = cam
        else:
            prob = float(clf.predict_proba(gray)[0])
        return {"probability": prob, "decision": decide(prob, threshold, band), "threshold": threshold, "band": band,
                "image_size": list(gray.shape[::-1]), "model": clf.name, "weights_sha256": clf.meta.weights_sha256,
                "disclaimer": DISCLAIMER, **out}

    try:
        return JSONResponse(await run_in_threadpool(work))
    except model.InvalidImageError as err:
        return _error(str(err))


app = Starlette(routes=[Route("/health", health), Route("/predict", predict, methods=["POST"])])
