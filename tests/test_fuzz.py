"""Structure-aware fuzzing of the decoder: mutated JPEG/PNG/TIFF/BMP/DICOM in -> a DecodedImage or
InvalidImageError, nothing else. CI runs a small campaign; the documented large one is

    FUZZ_EXAMPLES=10000 nice -n 15 uv run pytest -q -s tests/test_fuzz.py

(examples are split over the tests below; peak RSS is printed at the end)."""

from __future__ import annotations

import io
import os
import resource

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model.preprocessing import DecodedImage, InvalidImageError, decode
from tests.conftest import dicom_bytes, gradient_image

TOTAL = int(os.environ.get("FUZZ_EXAMPLES", "400"))
N_TESTS = 4
PROFILE = settings(max_examples=max(1, TOTAL // N_TESTS), deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))
COUNT = {"inputs": 0, "refused": 0, "decoded": 0}


def check(data: bytes) -> None:
    COUNT["inputs"] += 1
    try:
        out = decode(data)
    except InvalidImageError as err:
        COUNT["refused"] += 1
        assert str(err) and "Traceback" not in str(err)
        return
    COUNT["decoded"] += 1
    assert isinstance(out, DecodedImage) and out.gray.dtype == np.uint8 and out.gray.ndim == 2


def _enc(img, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


_G = gradient_image(72, 64)
SEEDS = {
    "png": _enc(Image.fromarray(_G), "PNG"),
    "png16": _enc(Image.fromarray(_G.astype(np.uint16) * 257), "PNG"),
    "jpeg": _enc(Image.fromarray(np.repeat(_G[..., None], 3, 2)), "JPEG"),
    "tiff": _enc(Image.fromarray(_G), "TIFF"),
    "tiff16": _enc(Image.fromarray(_G.astype(np.uint16) * 16), "TIFF"),
    "bmp": _enc(Image.fromarray(_G), "BMP"),
    "dicom": dicom_bytes(_G.astype(np.uint16) * 16, window=(2040, 4000)),
    "dicom_raw": dicom_bytes(_G.astype(np.uint16) * 16, preamble=False),
}


def _dicom_variant(ts: str) -> bytes:
    import pydicom
    ds = pydicom.dcmread(io.BytesIO(SEEDS["dicom"]))
    if ts == "deflate":
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    else:
        ds.compress(pydicom.uid.RLELossless, encoding_plugin="pydicom")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


SEEDS["dicom_deflate"] = _dicom_variant("deflate")
SEEDS["dicom_rle"] = _dicom_variant("rle")
NAMES = sorted(SEEDS)


@PROFILE
@given(st.sampled_from(NAMES), st.data())
def test_bit_flips_and_byte_writes(name, data):
    blob = bytearray(SEEDS[name])
    for _ in range(data.draw(st.integers(1, 12))):
        pos = data.draw(st.integers(0, min(len(blob) - 1, data.draw(st.sampled_from([300, len(blob) - 1])))))
        if data.draw(st.booleans()):
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            blob[pos] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, data.draw(st.integers(0, 255))]))
    check(bytes(blob))


@PROFILE
@given(st.sampled_from(NAMES), st.data())
def test_truncation_and_splices(name, data):
    blob = SEEDS[name]
    a = data.draw(st.integers(0, len(blob)))
    b = data.draw(st.integers(a, len(blob)))
    check(blob[:a] + data.draw(st.binary(max_size=64)) + blob[b:] if data.draw(st.booleans()) else blob[:a])


DICOM_FIELDS = {
    "Rows": st.one_of(st.integers(0, 70000), st.just("abc")),
    "Columns": st.integers(0, 70000),
    "NumberOfFrames": st.one_of(st.integers(-2, 200), st.just("abc"), st.just("1\\2")),
    "BitsAllocated": st.sampled_from([0, 1, 7, 8, 12, 16, 32, 64]),
    "BitsStored": st.integers(0, 40),
    "HighBit": st.integers(0, 40),
    "PixelRepresentation": st.integers(0, 2),
    "SamplesPerPixel": st.integers(0, 5),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL",
                                                  "YBR_FULL_422", "HSV", "", "monochrome2"]),
    "WindowCenter": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just("x")),
    "WindowWidth": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just("0")),
    "RescaleSlope": st.floats(-1e6, 1e6),
    "VOILUTFunction": st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS"]),
}
SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.3.4"]


@PROFILE
@given(st.sampled_from(["dicom", "dicom_deflate", "dicom_rle"]), st.data())
def test_dicom_header_fields(name, data):
    import pydicom
    ds = pydicom.dcmread(io.BytesIO(SEEDS[name]))
    for field in data.draw(st.lists(st.sampled_from(sorted(DICOM_FIELDS)), min_size=1, max_size=4, unique=True)):
        try:
            setattr(ds, field, data.draw(DICOM_FIELDS[field]))
        except Exception:
            return
    if data.draw(st.booleans()):
        ds.file_meta.TransferSyntaxUID = data.draw(st.sampled_from(SYNTAXES))
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except Exception:
        return  # pydicom refuses to write it: nothing to fuzz
    check(buf.getvalue())


@PROFILE
@given(st.sampled_from(["png", "png16", "bmp", "tiff", "tiff16", "jpeg"]), st.integers(1, 40), st.data())
def test_header_region_mutations(name, n, data):
    blob = bytearray(SEEDS[name])
    end = min(len(blob), 200)  # dimensions, bit depth, colour type, IFD entries, JPEG SOF live here
    for _ in range(n % 6 + 1):
        blob[data.draw(st.integers(0, end - 1))] = data.draw(st.integers(0, 255))
    check(bytes(blob))


def test_report():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nfuzz: {COUNT['inputs']} inputs, {COUNT['decoded']} decoded, {COUNT['refused']} refused "
          f"(InvalidImageError), 0 other exceptions; peak RSS {peak:.0f} MB")
