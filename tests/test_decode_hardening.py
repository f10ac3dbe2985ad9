"""Issue #9 regression corpus: every crash class found by fuzzing, the DICOM bomb, silent garbage,
formats, compressed transfer syntaxes and viewer windowing. All inputs are generated here."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import model.preprocessing as pp
from model.preprocessing import DecodedImage, InvalidImageError, as_gray, decode, decode_image
from tests.conftest import dicom_bytes, gradient_image


def _ds(data):
    import pydicom
    return pydicom.dcmread(io.BytesIO(data))


def _save(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


BASE = dicom_bytes(gradient_image().astype(np.uint16) * 16)


def _with(**tags) -> bytes:
    ds = _ds(BASE)
    for k, v in tags.items():
        setattr(ds, k, v)
    return _save(ds)


def test_decoded_image_interface():
    d = decode(BASE)
    assert isinstance(d, DecodedImage) and d.format == "DICOM" and d.colorfulness == 0.0
    assert d.dicom["Modality"] == "DX" and d.dicom["Rows"] == "120" and "Explicit VR" in d.dicom["TransferSyntaxUID"]
    assert decode(d) is d and as_gray(d) is d.gray
    rgb = np.zeros((80, 80, 3), np.uint8)
    rgb[..., 0] = 255
    assert decode(rgb).colorfulness > 50 and decode(rgb).format == "array"
    assert decode(np.repeat(gradient_image()[..., None], 3, 2)).colorfulness < 1


@pytest.mark.parametrize("tags, match", [
    ({"PhotometricInterpretation": "MONOCHROME2", "SamplesPerPixel": 3}, "inconsistent"),
    ({"PhotometricInterpretation": "HSV"}, "photometric"),
    ({"Rows": 0}, "empty|small"),
])
def test_bad_dicom_headers_are_refused(tags, match):
    with pytest.raises(InvalidImageError, match=match):
        decode_image(_with(**tags))


@pytest.mark.parametrize("value", [b"abc ", b"1\\2 "])
def test_bad_number_of_frames_is_refused(value):
    data = _with(NumberOfFrames=1234)
    tag = b"\x28\x00\x08\x00IS\x04\x001234"
    assert tag in data
    with pytest.raises(InvalidImageError, match="NumberOfFrames"):
        decode_image(data.replace(tag, tag[:8] + value))


def test_unknown_vr_and_bad_lengths_are_refused():
    data = bytearray(BASE)
    i = data.find(b"\x28\x00\x10\x00US")  # Rows: give it a VR pydicom does not know
    data[i + 4:i + 6] = b"ZZ"
    with pytest.raises(InvalidImageError):
        decode_image(bytes(data))
    data = bytearray(BASE)
    data[i + 6:i + 8] = struct.pack("<H", 3)  # US with a length of 3 bytes (BytesLengthException)
    with pytest.raises(InvalidImageError):
        decode_image(bytes(data))


def test_truncated_deflate_dicom_and_bomb():
    ds = _ds(BASE)
    import pydicom
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    good = _save(ds)
    assert decode_image(good).shape == (120, 90)
    with pytest.raises(InvalidImageError):
        decode_image(good[: len(good) - 200])  # zlib.error / truncated stream
    # bomb: 8 x 8 declared, 512 MB of zero pixel data behind a ~0.5 MB deflate stream
    big = np.zeros((64, 64), np.uint16)
    ds = _ds(dicom_bytes(big))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    raw = _save(ds)
    meta_end = 144 + struct.unpack("<I", raw[140:144])[0]  # preamble + DICM + group length element + group
    body = zlib.decompress(raw[meta_end:], -zlib.MAX_WBITS)
    pix = body.index(b"\xe0\x7f\x10\x00OW")
    n = 64 * 2**20  # the fuzzed bomb was 512 MB; any size over the declared 8 KB (+16 MB slack) is refused
    body = body[:pix] + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", n)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = c.compress(body) + b"".join(c.compress(bytes(2**20)) for _ in range(n // 2**20)) + c.flush()
    bomb = raw[:meta_end] + stream
    assert len(bomb) < 1_000_000
    with pytest.raises(InvalidImageError, match="bomb|too much"):
        decode_image(bomb)


def test_bitflipped_16bit_tiff_and_unexpected_errors_become_invalid_image(monkeypatch):
    data = bytearray(io.BytesIO().getvalue())
    buf = io.BytesIO()
    Image.fromarray(gradient_image().astype(np.uint16) * 16).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    for pos in range(8, min(len(data), 200), 7):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        try:
            decode_image(bytes(flipped))
        except InvalidImageError:
            pass

    def boom(*a, **k):
        raise TypeError("Missing dimensions")
    monkeypatch.setattr(pp, "_pil_to_gray", boom)
    with pytest.raises(InvalidImageError, match="could not be decoded"):
        decode_image(data)

    def oom(*a, **k):
        raise MemoryError
    monkeypatch.setattr(pp, "_decode_raster", oom)
    with pytest.raises(InvalidImageError, match="memory"):
        decode_image(data)


@pytest.mark.parametrize("arr", [np.zeros((0, 0)), np.zeros((7000, 7000), np.uint8), np.full((100, 100), np.nan),
                                 np.zeros((2, 100, 100, 3)), np.zeros((100, 100), complex), np.zeros(100)])
def test_arrays_get_the_same_checks(arr):
    with pytest.raises(InvalidImageError):
        decode_image(arr)


def test_as_gray_refuses_empty_and_oversized_arrays():
    with pytest.raises(InvalidImageError):
        as_gray(np.zeros((0, 0), np.uint8))
    with pytest.raises(InvalidImageError, match="too large"):
        as_gray(np.zeros((7000, 7000), np.uint8))


@pytest.mark.parametrize("fmt, name", [("WEBP", "WebP"), ("GIF", "GIF")])
def test_other_formats_are_refused_by_name(fmt, name):
    buf = io.BytesIO()
    Image.fromarray(gradient_image()).save(buf, format=fmt)
    with pytest.raises(InvalidImageError, match=f"{name} is not supported.*JPEG, PNG, BMP, TIFF, DICOM"):
        decode_image(buf.getvalue())


def test_eps_never_reaches_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript called"))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n"
    with pytest.raises(InvalidImageError, match="not supported"):
        decode_image(eps)


SYNTAX_FILES = {
    "JPEG Lossless SV1": "SC_rgb_jpeg_gdcm.dcm",
    "JPEG-LS lossless": "MR_small_jpeg_ls_lossless.dcm",
    "JPEG 2000 lossless": "MR_small_jp2klossless.dcm",
    "JPEG 2000": "JPEG2000.dcm",
    "JPEG Extended 12-bit": "JPGExtended.dcm",
    "RLE": "SC_rgb_rle.dcm",
    "RLE 16-bit mono": "MR_small_RLE.dcm",
    "Deflate": "image_dfl.dcm",
    "JPEG baseline YBR": "SC_rgb_dcmtk_+eb+cy+np.dcm",
}


@pytest.mark.parametrize("label", sorted(SYNTAX_FILES))
def test_compressed_transfer_syntaxes_decode(label):
    from pydicom.data import get_testdata_file
    path = get_testdata_file(SYNTAX_FILES[label], download=False)
    if path is None:
        pytest.skip(f"{SYNTAX_FILES[label]} not bundled with this pydicom")
    d = decode(path)
    assert d.format == "DICOM" and d.gray.dtype == np.uint8 and d.gray.std() > 1, label


def test_palette_color_dicom():
    from pydicom.data import get_testdata_file
    path = get_testdata_file("OBXXXX1A.dcm", download=False)  # may not be bundled: build one instead
    ds = _ds(dicom_bytes(gradient_image().astype(np.uint16)))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = gradient_image().tobytes()
    ramp = np.arange(256, dtype=np.uint16) * 257
    for k in (1, 2, 3):
        ds.add_new(0x00281100 + k, "US", [256, 0, 16])
        ds.add_new(0x00281200 + k, "OW", ramp.tobytes())
    d = decode(_save(ds))
    assert np.abs(d.gray.astype(int) - gradient_image()).max() <= 1 and d.colorfulness < 1
    del path


def test_raw_dicom_without_preamble():
    raw = dicom_bytes(gradient_image().astype(np.uint16) * 16, preamble=False)
    assert decode(raw).gray.shape == (120, 90)
    with pytest.raises(InvalidImageError):
        decode_image(raw[:40])


@pytest.mark.parametrize("func, window", [("LINEAR", (2040.5, 4081)), ("LINEAR_EXACT", (2040, 4080))])
def test_windowed_12bit_dicom_of_a_film_decodes_to_the_film(real_images, func, window):
    film = decode_image(real_images["PNEUMONIA"][0])
    data = dicom_bytes(film.astype(np.uint16) * 16, window=window)
    ds = _ds(data)
    ds.VOILUTFunction = func
    out = decode_image(_save(ds))
    assert np.abs(out.astype(int) - film).max() <= 1


def test_window_saturates_and_is_not_restretched():
    g = gradient_image()
    out = decode_image(dicom_bytes(g.astype(np.uint16) * 16, window=(2048, 8192)))  # window wider than the data
    assert out.max() < 200 and out.min() > 60  # a viewer shows it grey, not stretched to 0..255
