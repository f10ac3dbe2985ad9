"""Property-based and stress tests: any bytes in -> a valid tensor or the one clear error; shared model
under concurrent load -> serial results."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model.preprocessing import MAX_PIXELS, InvalidImageError, decode_image, preprocess
from tests.conftest import dicom_bytes, gradient_image

PROFILE = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def check(data) -> None:
    """The contract: a float tensor 1 x 64 x 64 with finite values, or InvalidImageError - nothing else."""
    try:
        t = preprocess(data, 64, 0.5, 0.25)
    except InvalidImageError as err:
        assert str(err) and "Traceback" not in str(err)
        return
    assert t.shape == (1, 64, 64) and t.dtype == torch.float32 and torch.isfinite(t).all()


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


VALID = {
    "png": _encode(Image.fromarray(gradient_image()), "PNG"),
    "jpeg": _encode(Image.fromarray(gradient_image()), "JPEG"),
    "tiff": _encode(Image.fromarray(gradient_image()), "TIFF"),
    "bmp": _encode(Image.fromarray(gradient_image()), "BMP"),
    "dicom": dicom_bytes(gradient_image().astype(np.uint16) * 16),
}


@PROFILE
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    check(data)


@PROFILE
@given(st.sampled_from(sorted(VALID)), st.data())
def test_truncated_files(fmt, data):
    blob = VALID[fmt]
    cut = data.draw(st.integers(0, len(blob) - 1))
    check(blob[:cut])


@PROFILE
@given(st.sampled_from(sorted(VALID)), st.data())
def test_corrupted_bytes(fmt, data):
    blob = bytearray(VALID[fmt])
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    check(bytes(blob))


def _png_header(w: int, h: int, depth: int = 8, color: int = 0) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@PROFILE
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))
def test_huge_declared_dimensions_are_refused_cheaply(w, h):
    try:
        decode_image(_png_header(w, h))
    except InvalidImageError as err:
        if w * h > MAX_PIXELS:
            assert "too large" in str(err)
        return
    assert w * h <= MAX_PIXELS


@PROFILE
@given(st.integers(1, 2**16 - 1), st.integers(1, 2**16 - 1))
def test_huge_dicom_dimensions(rows, cols):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(VALID["dicom"]))
    ds.Rows, ds.Columns = rows, cols  # pixel data no longer matches: must be refused, never allocated blindly
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    check(buf.getvalue())


MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA", "YCbCr"]


@PROFILE
@given(st.sampled_from(MODES), st.integers(64, 300), st.integers(64, 300), st.sampled_from(["PNG", "TIFF", "JPEG", "BMP"]),
       st.integers(0, 2**32 - 1))
def test_odd_modes_and_formats(mode, w, h, fmt, seed):
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8))
    img = base.convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        (rng.random((h, w)) * {"I;16": 65535, "I": 2**20, "F": 1e3}[mode]).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    try:
        data = _encode(img, fmt)
    except (OSError, KeyError, ValueError):
        return  # this format cannot store this mode: nothing to test
    t = preprocess(data, 64, 0.5, 0.25)  # every storable mode must be accepted
    assert t.shape == (1, 64, 64) and torch.isfinite(t).all()


def test_concurrent_predict_and_explain_16_threads(tiny_classifier, real_images):
    """16 threads x 10 requests of predict + explain on one shared model: identical to serial, no deadlock."""
    files = real_images["NORMAL"] + real_images["PNEUMONIA"]
    serial = {f: (tiny_classifier.predict_proba(f)[0], tiny_classifier.explain(f)) for f in files}

    def worker(k):
        out = []
        for j in range(10):
            f = files[(k + j) % len(files)]
            out.append((f, tiny_classifier.predict_proba(f)[0], tiny_classifier.explain(f)))
        return out

    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(worker, k) for k in range(16)]
        results = [r for fut in futures for r in fut.result(timeout=600)]
    assert len(results) == 160
    for f, p, heat in results:
        assert p == pytest.approx(serial[f][0], abs=1e-6)
        np.testing.assert_allclose(heat, serial[f][1], atol=1e-5)
