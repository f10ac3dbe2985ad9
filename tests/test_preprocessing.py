"""The one preprocessing path: every format users upload, and a clear error for everything else."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.preprocessing import (
    MAX_PIXELS, InvalidImageError, decode_image, load_square, normalize, preprocess, resize_square,
)
from tests.conftest import dicom_bytes, gradient_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def gray():
    return gradient_image()


# ---- raster formats --------------------------------------------------------------------------


def test_png_gray_is_lossless(gray):
    assert np.array_equal(decode_image(encode(Image.fromarray(gray), "PNG")), gray)


def test_rgb_with_equal_channels_equals_gray(gray):
    rgb = Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(decode_image(encode(rgb, "PNG")), gray)


def test_jpeg_rgb_close_to_source(gray):
    rgb = Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    out = decode_image(encode(rgb, "JPEG", quality=95))
    assert out.shape == gray.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - gray).mean() < 3


def test_16bit_png_is_windowed_to_full_range(gray):
    sixteen = (gray.astype(np.uint16) * 16 + 1000)  # 12-bit-like values stored in 16 bits
    im = Image.fromarray(sixteen.astype(np.uint16))
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    # monotone mapping: ordering of pixel values is preserved
    assert np.corrcoef(out.ravel(), gray.ravel())[0, 1] > 0.999


def test_rgba_is_composited(gray):
    rgba = np.dstack([np.repeat(gray[..., None], 3, axis=2), np.full_like(gray, 255)])
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.array_equal(out, gray)
    rgba[..., 3] = 0  # fully transparent -> black background
    assert decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")).max() == 0


def test_palette_image(gray):
    pal = Image.fromarray(gray).convert("P")
    out = decode_image(encode(pal, "PNG"))
    assert out.shape == gray.shape and np.abs(out.astype(int) - gray).mean() < 4


def test_cmyk_jpeg(gray):
    cmyk = Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.shape == gray.shape
    assert np.corrcoef(out.ravel(), gray.ravel())[0, 1] > 0.98


def test_exif_orientation_is_applied(gray):
    im = Image.fromarray(gray)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(encode(im, "JPEG", quality=95, exif=exif.tobytes()))
    expected = np.rot90(gray, k=-1)  # 90 degrees clockwise
    assert out.shape == expected.shape == (gray.shape[1], gray.shape[0])
    assert np.abs(out.astype(int) - expected).mean() < 3


def test_bmp_tiff_and_paths(tmp_path, gray):
    for fmt, ext in (("BMP", "bmp"), ("TIFF", "tif")):
        p = tmp_path / f"x.{ext}"
        Image.fromarray(gray).save(p, format=fmt)
        assert np.array_equal(decode_image(p), gray)
        assert np.array_equal(decode_image(str(p)), gray)
        with open(p, "rb") as f:
            assert np.array_equal(decode_image(f), gray)


def test_pil_and_numpy_inputs(gray):
    assert np.array_equal(decode_image(Image.fromarray(gray)), gray)
    assert np.array_equal(decode_image(gray), gray)
    assert np.array_equal(decode_image(np.repeat(gray[..., None], 3, axis=2)), gray)
    assert decode_image(gray.astype(np.float32) / 255).max() == 255


def test_real_xray_round_trip(real_images):
    path = real_images["NORMAL"][0]
    out = decode_image(path)
    assert out.shape == (224, 224) and out.dtype == np.uint8 and out.std() > 10


# ---- DICOM ----------------------------------------------------------------------------------------


def test_dicom_monochrome2_uses_bits_and_window(gray):
    pixels = gray.astype(np.uint16) * 16  # 0..4080 in 12 bits
    out = decode_image(dicom_bytes(pixels))
    assert out.shape == gray.shape
    assert np.corrcoef(out.ravel(), gray.ravel())[0, 1] > 0.999
    # a narrow VOI window saturates everything outside it
    windowed = decode_image(dicom_bytes(pixels, window=(2040, 400)))
    assert (windowed == 0).mean() > 0.2 and (windowed == 255).mean() > 0.2


def test_dicom_monochrome1_is_inverted(gray):
    pixels = gray.astype(np.uint16) * 16
    m2 = decode_image(dicom_bytes(pixels, "MONOCHROME2"))
    m1 = decode_image(dicom_bytes(pixels, "MONOCHROME1"))
    assert np.array_equal(m1, 255 - m2)


def test_dicom_modality_lut_applied(gray):
    pixels = gray.astype(np.uint16) * 16
    base = decode_image(dicom_bytes(pixels))
    rescaled = decode_image(dicom_bytes(pixels, slope=-1.0, intercept=4095.0))  # negative slope flips
    assert np.corrcoef(base.ravel(), rescaled.ravel())[0, 1] < -0.999


def test_dicom_without_preamble_and_extension(tmp_path, gray):
    data = dicom_bytes(gray.astype(np.uint16) * 16, preamble=False)
    assert data[128:132] != b"DICM"
    p = tmp_path / "IMG0001"  # extensionless, as PACS exports often are
    p.write_bytes(data)
    assert decode_image(p).shape == gray.shape


def test_dicom_multiframe_uses_first_frame_with_content(gray):
    frames = np.stack([np.zeros_like(gray, dtype=np.uint16), gray.astype(np.uint16) * 16])
    out = decode_image(dicom_bytes(frames, frames=2))
    assert out.shape == gray.shape and out.max() == 255


def test_dicom_multiframe_without_content_is_refused(gray):
    frames = np.zeros((2, *gray.shape), dtype=np.uint16)
    with pytest.raises(InvalidImageError, match="no frame"):
        decode_image(dicom_bytes(frames, frames=2))


def test_dicom_without_pixels_is_refused(gray):
    with pytest.raises(InvalidImageError, match="no image"):
        decode_image(dicom_bytes(gray, pixel_data=False))


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"hello, I am a text file\n" * 20, "not a recognised image"),
    (b"%PDF-1.4\n" + b"0" * 500, "not a recognised image"),
    (bytes(range(256)) * 8, "not a recognised image"),
])
def test_not_an_image(data, match):
    with pytest.raises(InvalidImageError, match=match):
        decode_image(data)


def test_truncated_jpeg_and_png(gray):
    for fmt in ("JPEG", "PNG"):
        data = encode(Image.fromarray(gray), fmt)
        with pytest.raises(InvalidImageError, match="truncated|corrupt|decoded"):
            decode_image(data[: len(data) // 2])


def test_decompression_bomb_refused_before_decoding():
    # a PNG whose header declares 30000 x 30000 pixels but whose body is tiny
    side = 30000
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    assert side * side > MAX_PIXELS
    with pytest.raises(InvalidImageError, match="too large"):
        decode_image(data)


def test_dicom_bomb_refused():
    data = dicom_bytes(np.zeros((8, 8), np.uint16))
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows = ds.Columns = 20000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(InvalidImageError, match="too large"):
        decode_image(buf.getvalue())


def test_too_small_refused():
    with pytest.raises(InvalidImageError, match="too small"):
        decode_image(encode(Image.new("L", (32, 200)), "PNG"))


def test_missing_path_and_bad_type(tmp_path):
    with pytest.raises(InvalidImageError, match="not found"):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(InvalidImageError, match="Unsupported input"):
        decode_image(12345)


# ---- geometry and normalisation --------------------------------------------------------------------


def test_resize_squashes_any_size(gray):
    for shape in ((64, 64), (300, 1000), (2000, 1500)):
        img = np.asarray(Image.fromarray(gray).resize(shape[::-1]))
        assert resize_square(img, 96).shape == (96, 96)


def test_preprocess_output_contract(gray):
    t = preprocess(encode(Image.fromarray(gray), "PNG"), 64, mean=0.5, std=0.25)
    assert t.shape == (1, 64, 64) and t.dtype == torch.float32
    sq = load_square(gray, 64)
    assert torch.allclose(t, (torch.from_numpy(np.array(sq)).float() / 255 - 0.5) / 0.25)
    assert torch.equal(normalize(torch.from_numpy(np.array(sq))[None], 0.5, 0.25), t)


def test_same_picture_in_any_format_gives_nearly_the_same_tensor(gray):
    """Formats a user might send for one film agree once preprocessed (no format-dependent skew)."""
    big = np.asarray(Image.fromarray(gray).resize((360, 480), Image.BILINEAR))
    inputs = {
        "png8": encode(Image.fromarray(big), "PNG"),
        "rgb_jpeg": encode(Image.fromarray(np.repeat(big[..., None], 3, 2)), "JPEG", quality=98),
        "dicom12": dicom_bytes(big.astype(np.uint16) * 16 + 7, bits_stored=12),
        "png16": encode(Image.fromarray(big.astype(np.uint16) * 257), "PNG"),
    }
    ref = preprocess(inputs["png8"], 64, 0.5, 0.25)
    for name, data in inputs.items():
        diff = (preprocess(data, 64, 0.5, 0.25) - ref).abs().mean().item()
        assert diff < 0.05, name


# ---- spectrum matching (invariance to blur, sharpening, softer devices) ---------------------------


def _films(real_images):
    return [decode_image(p) for c in ("NORMAL", "PNEUMONIA") for p in real_images[c]]


def _model_input(gray: np.ndarray, spectrum) -> torch.Tensor:
    return normalize(resize_square(gray, 192), 0.5, 0.25, equalize_hist=True, spectrum=spectrum)


def _reference(films) -> list[float]:
    from model.preprocessing import equalize, radial_spectrum

    sq = torch.stack([torch.from_numpy(resize_square(g, 192).copy()) for g in films])
    return radial_spectrum(equalize(sq)).mean(0).tolist()


def test_spectrum_matching_divides_out_blur_and_sharpening(real_images):
    """A blurred or sharpened film reaches the network with the original's spectrum, up to the frequencies
    where the gain clamp stops (what a blur erased is not invented)."""
    from PIL import ImageFilter

    from model.preprocessing import radial_spectrum

    films = _films(real_images)
    ref = _reference(films)
    filters = {"blur": ImageFilter.GaussianBlur(1.0), "sharpen": ImageFilter.UnsharpMask(radius=2, percent=80, threshold=0)}
    for name, f in filters.items():
        for g in films:
            h = np.asarray(Image.fromarray(g).filter(f))
            err = {}
            for key, spectrum in (("plain", None), ("matched", ref)):
                a, b = (radial_spectrum(_model_input(x, spectrum))[0, 1:13] for x in (h, g))
                err[key] = float((a / b).log().abs().mean())
            assert err["matched"] < 0.5 * err["plain"], (name, err)


def test_spectrum_matching_keeps_what_equalisation_gives(real_images):
    """Gamma and window/level still vanish (equalisation runs first), the film's own spectrum is left as it
    is, and a batch gives what single images give."""
    from model.preprocessing import equalize, match_spectrum, radial_spectrum

    films = _films(real_images)
    ref = _reference(films)
    g = films[0]
    gamma = np.clip(np.round((g / 255.0) ** 0.8 * 255), 0, 255).astype(np.uint8)
    plain = float((_model_input(gamma, None) - _model_input(g, None)).abs().mean())  # uint8 ties only
    assert float((_model_input(gamma, ref) - _model_input(g, ref)).abs().mean()) < max(2 * plain, 0.01) < 0.05
    x = equalize(torch.from_numpy(resize_square(g, 192)))
    own = radial_spectrum(x)
    assert torch.allclose(match_spectrum(x, own), x, atol=1e-4)
    batch = normalize(np.stack([resize_square(f, 192) for f in films])[:, None], 0.5, 0.25, True, ref)
    single = torch.stack([_model_input(f, ref) for f in films])
    assert torch.allclose(batch, single, atol=1e-5)
    assert torch.isfinite(normalize(np.zeros((192, 192), np.uint8), 0.5, 0.25, True, ref)).all()  # a blank image


def test_artifact_refuses_a_malformed_spectrum(tmp_path):
    import json

    import model
    from model.artifact import ModelArtifactError
    from tests.conftest import make_artifact

    d = make_artifact(tmp_path / "m")
    meta = json.loads((d / "model.json").read_text())
    for bad in ([1.0] * 3, ["x"] * 25, [float("nan")] * 25, [0.0] * 25, "abc"):
        (d / "model.json").write_text(json.dumps({**meta, "spectrum": bad}))
        with pytest.raises(ModelArtifactError, match="spectrum"):
            model.load_model(d)
    (d / "model.json").write_text(json.dumps({**meta, "spectrum": [1.0] * 25}))
    assert model.load_model(d).meta.spectrum == [1.0] * 25


# ---- smoothed equalisation and band limit (sharpening, noise, softer devices) -----------------------


def _unsharp(g: np.ndarray) -> np.ndarray:
    from PIL import ImageFilter

    return np.asarray(Image.fromarray(g).filter(ImageFilter.UnsharpMask(radius=2, percent=80, threshold=0)))


def _down_up(g: np.ndarray) -> np.ndarray:
    h, w = g.shape
    return np.asarray(Image.fromarray(g).resize((w // 2, h // 2), Image.BILINEAR).resize((w, h), Image.BILINEAR))


def test_smoothed_equalisation_keeps_sharpening_from_shifting_whole_regions(real_images):
    """Read from the full-resolution histogram, the mapping passes a sharpened film's wider histogram on as a
    change of the lowest frequencies (whole regions brighter or darker); read from a smoothed copy it does not."""
    from model.preprocessing import _rings, equalize

    ring0 = _rings(192, 192) == 0
    ratios = []
    for g in _films(real_images):
        low = {}
        for sigma in (0.0, 2.0):
            a, b = (equalize(torch.from_numpy(resize_square(x, 192).copy()), sigma) for x in (_unsharp(g), g))
            low[sigma] = float(np.abs(np.fft.rfft2((a - b).numpy()))[ring0].sum())
        ratios.append(low[2.0] / low[0.0])
    assert max(ratios) < 0.95 and np.mean(ratios) < 0.8, ratios  # measured: 0.57-0.91, mean 0.69


def test_smoothed_equalisation_is_a_monotone_map_into_the_unit_range(real_images):
    """Still one increasing mapping of the film's own levels (anatomy untouched), in [0, 1], invariant to
    gamma up to what smoothing and uint8 rounding leave; a blank image stays finite; a batch gives what singles give."""
    from model.preprocessing import equalize

    g = resize_square(_films(real_images)[0], 192)
    x = equalize(torch.from_numpy(g), 2.0)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.99
    order = np.argsort(g.ravel(), kind="stable")
    assert (np.diff(x.numpy().ravel()[order]) >= -1e-6).all()
    gamma = np.clip(np.round((g / 255.0) ** 0.8 * 255), 0, 255).astype(np.uint8)
    assert float((equalize(torch.from_numpy(gamma), 2.0) - x).abs().mean()) < 0.02
    assert torch.isfinite(equalize(torch.zeros(1, 64, 64, dtype=torch.uint8), 2.0)).all()
    films = np.stack([resize_square(f, 192) for f in _films(real_images)])
    assert torch.allclose(equalize(torch.from_numpy(films), 2.0),
                          torch.stack([equalize(torch.from_numpy(f), 2.0) for f in films]), atol=1e-6)


def test_band_limit_removes_what_a_softer_device_changes(real_images):
    """2x down/up-sampling differs from the original mostly in the upper band; low-passed alike, the two
    inputs are much closer. The mean and the lowest frequencies pass unchanged."""
    from model.preprocessing import match_spectrum

    films = _films(real_images)
    ref = _reference(films)
    for g in films:
        plain = (_model_input(_down_up(g), ref) - _model_input(g, ref)).pow(2).mean()
        banded = (normalize(resize_square(_down_up(g), 192), 0.5, 0.25, True, ref, band_limit=0.35)
                  - normalize(resize_square(g, 192), 0.5, 0.25, True, ref, band_limit=0.35)).pow(2).mean()
        assert banded < 0.3 * plain, (float(banded), float(plain))
    x = torch.rand(1, 64, 64)
    low = match_spectrum(x, None, 0.35)
    assert abs(float(low.mean() - x.mean())) < 1e-5 and float(low.std()) < float(x.std())
    smooth = torch.linspace(0, 1, 64).repeat(64, 1)[None]  # one slow ramp: almost all of it passes
    assert float((match_spectrum(smooth, None, 0.35) - smooth)[:, 8:-8, 8:-8].abs().max()) < 0.02


def test_artifact_refuses_malformed_preprocessing_settings(tmp_path):
    import json

    import model
    from model.artifact import ModelArtifactError
    from tests.conftest import make_artifact

    d = make_artifact(tmp_path / "m")
    meta = json.loads((d / "model.json").read_text())
    for key, bad in (("equalize_sigma", -1), ("equalize_sigma", "2"), ("equalize_sigma", float("inf")), ("equalize_sigma", 99),
                     ("band_limit", 0), ("band_limit", -0.3), ("band_limit", True), ("band_limit", "0.3")):
        (d / "model.json").write_text(json.dumps({**meta, key: bad}))
        with pytest.raises(ModelArtifactError, match=key):
            model.load_model(d)
    (d / "model.json").write_text(json.dumps({**meta, "equalize_sigma": 2, "band_limit": 0.35}))
    m = model.load_model(d).meta
    assert (m.equalize_sigma, m.band_limit) == (2, 0.35)
