"""The one preprocessing path shared by training, evaluation and the app.

Three stages, each usable alone so callers can cache or display intermediate results:

    decode(source)                -> DecodedImage: .gray uint8 H x W (full resolution, display-ready),
                                     .format, .colorfulness, .dicom (technical tags)
    decode_image(source)          -> decode(source).gray
    resize_square(gray, size)     -> uint8 grayscale S x S   (what the training cache stores)
    normalize(gray_sq, mean, std, ...) -> float32 tensor 1 x S x S
                                     (optionally rank-equalised, spectrum-matched and band-limited first)

``preprocess`` chains them. Any decoding problem raises :class:`InvalidImageError` with a message a
person can act on; nothing else escapes for bad input.

Resizing squashes to S x S (aspect ratio not kept) with bilinear interpolation, because the shared
training copies were produced exactly that way; padding or cropping at inference would be a
train/serve skew.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse decompression bombs well before PIL's own (much higher) limit: a 40 MP radiograph is
# already larger than any chest detector produces (typical CR/DR: 5-15 MP).
MAX_PIXELS = 40_000_000
MIN_SIDE = 64
MAX_FILE_BYTES = 200 * 1024 * 1024

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike, IO[bytes], Image.Image, np.ndarray, "DecodedImage"]


class InvalidImageError(ValueError):
    """The input cannot be used as a chest X-ray; ``str(err)`` is written for the end user."""


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------

SUPPORTED = "JPEG, PNG, BMP, TIFF, DICOM"
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")  # the documented formats; nothing else reaches Pillow
MAX_FRAMES = 64
# Upper bound on the decoded pixel bytes a DICOM may declare (all frames and samples together), and
# so on how far a Deflate-compressed DICOM may inflate: about four 40 MP 16-bit frames.
MAX_DECODED_BYTES = 320 * 1024 * 1024
_DEFLATED = "1.2.840.10008.1.2.1.99"
_DICOM_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "PhotometricInterpretation", "BitsStored", "Rows",
               "Columns")

# Magic numbers of formats people try to upload, so the refusal can name them. Pillow is never asked
# to open these (EPS would start Ghostscript).
_KNOWN_UNSUPPORTED = (
    (0, b"GIF8", "GIF"), (0, b"%!PS", "PostScript/EPS"), (0, b"\xc5\xd0\xd3\xc6", "EPS"), (0, b"%PDF", "PDF"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (0, b"\xff\x4f\xff\x51", "JPEG 2000"), (0, b"8BPS", "Photoshop"),
    (0, b"\x00\x00\x01\x00", "ICO"), (0, b"DDS ", "DDS"), (0, b"qoif", "QOI"), (0, b"\x76\x2f\x31\x01", "OpenEXR"),
    (0, b"\xff\x0a", "JPEG XL"), (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (0, b"gimp xcf", "GIMP XCF"),
    (0, b"P1", "PNM"), (0, b"P2", "PNM"), (0, b"P3", "PNM"), (0, b"P4", "PNM"), (0, b"P5", "PNM"), (0, b"P6", "PNM"),
    (0, b"\x59\xa6\x6a\x95", "Sun raster"), (0, b"\x01\xda", "SGI"), (0, b"\x0a", "PCX"), (0, b"\x8aMNG", "MNG"),
)


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """One decoded input: the grey image every later stage uses, plus facts the input gate needs."""

    gray: np.ndarray  # uint8 H x W, full resolution (what decode_image returns)
    format: str  # "JPEG", "PNG", "BMP", "TIFF", "DICOM", "array", "PIL"
    colorfulness: float = 0.0  # Hasler & Suesstrunk (2003) M of the RGB content before the grey conversion
    dicom: dict = field(default_factory=dict)  # technical DICOM tags only (never patient identifiers)


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness M of a uint8 H x W x 3 image (0 for grey, ~0..150).

    Large images are subsampled to about 1 MP: M is a global statistic."""
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 1_000_000)))
    rgb = rgb[::step, ::step, :3].astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    sigma = np.sqrt(rg.std() ** 2 + yb.std() ** 2)
    mu = np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(sigma + 0.3 * mu)


def _read_bytes(source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > MAX_FILE_BYTES:
            raise InvalidImageError(f"The file is larger than {MAX_FILE_BYTES // 2**20} MB.")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidImageError(f"File not found: {path}")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise InvalidImageError(f"{path.name} is larger than {MAX_FILE_BYTES // 2**20} MB.")
        data = path.read_bytes()
    elif hasattr(source, "read"):
        if hasattr(source, "seek"):
            source.seek(0)
        data = source.read(MAX_FILE_BYTES + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidImageError("The file must be opened in binary mode.")
        data = bytes(data)
        if len(data) > MAX_FILE_BYTES:
            raise InvalidImageError(f"The file is larger than {MAX_FILE_BYTES // 2**20} MB.")
    else:
        raise InvalidImageError(f"Unsupported input type: {type(source).__name__}.")
    if not data:
        raise InvalidImageError("The file is empty.")
    return data


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _looks_like_raw_dicom(data: bytes) -> bool:
    """A DICOM stream without preamble starts with a group 0002 or 0008 element (little endian)."""
    return len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[2:4] in (b"\x00\x00", b"\x01\x00",
                                                                                      b"\x02\x00", b"\x05\x00",
                                                                                      b"\x08\x00", b"\x10\x00",
                                                                                      b"\x12\x00", b"\x16\x00")


def _unsupported_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        return "AVIF" if brand.startswith(b"avi") else "HEIC/HEIF" if brand[:3] in (b"hei", b"mif", b"hev") else "MP4/QuickTime"
    for offset, magic, name in _KNOWN_UNSUPPORTED:
        if data[offset:offset + len(magic)] == magic:
            return name
    return None


def _not_recognised(data: bytes) -> InvalidImageError:
    name = _unsupported_format(data)
    if name:
        return InvalidImageError(f"This file is not a recognised image: {name} is not supported "
                                 f"(supported formats: {SUPPORTED}).")
    return InvalidImageError(f"This file is not a recognised image (supported formats: {SUPPORTED}).")


def _check_dims(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise InvalidImageError(
            f"The image is too large ({width} x {height} = {width * height / 1e6:.0f} megapixels; "
            f"the limit is {MAX_PIXELS / 1e6:.0f}). Downscale it and try again."
        )
    if min(width, height) < MIN_SIDE:
        raise InvalidImageError(
            f"The image is too small ({width} x {height}); at least {MIN_SIDE} px on each side is needed."
        )


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Linearly window a high-bit-depth or float image to 0..255 using its own value range."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind not in "iuf":
        raise InvalidImageError(f"Unsupported pixel type: {arr.dtype}.")
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        raise InvalidImageError("The image contains no valid pixel values.")
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    arr = np.where(finite, arr, lo)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _rgb_to_gray(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """uint8 H x W x 3 -> (grey as Pillow's ITU-R 601 'L' conversion, colourfulness)."""
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    gray = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.uint8)
    return gray, colorfulness(rgb)


def _pil_to_gray(im: Image.Image) -> tuple[np.ndarray, float]:
    _check_dims(*im.size)
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF must not make an otherwise fine image unusable
        pass
    _check_dims(*im.size)
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _to_uint8(np.asarray(im)), 0.0
    if mode in ("1", "L"):
        return np.asarray(im.convert("L"), dtype=np.uint8), 0.0
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, rgba)
    return _rgb_to_gray(np.asarray(im.convert("RGB")))  # CMYK, YCbCr, P, RGB, LAB ... through RGB


def _decode_raster(data: bytes) -> DecodedImage:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
            _check_dims(*im.size)  # header only: refuse bombs before decoding pixels
            im.load()
            fmt = "JPEG" if im.format == "MPO" else str(im.format)
            gray, colour = _pil_to_gray(im)
        except InvalidImageError:
            raise
        except UnidentifiedImageError:
            raise _not_recognised(data) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InvalidImageError(
                f"The image is too large: it declares more pixels than can be decoded safely (limit {MAX_PIXELS / 1e6:.0f} megapixels)."
            ) from None
        except MemoryError:
            raise InvalidImageError("The image needs more memory to decode than is available.") from None
        except Exception as err:  # Pillow's plugins raise many types on corrupt data
            msg = str(err)
            if "truncated" in msg or "broken data stream" in msg or isinstance(err, EOFError):
                raise InvalidImageError("The image file is truncated or corrupt.") from None
            raise InvalidImageError(f"The image could not be decoded ({_short(msg) or type(err).__name__}).") from None
    return DecodedImage(gray, fmt, colour, {})


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- DICOM ----------------------------------------------------------------------------------------


def _tag(ds, name: str, default=None):
    """A data element's value, or ``default`` when absent or unreadable (lazily converted values raise)."""
    try:
        value = ds.get(name, default)
    except Exception:
        return default
    return default if value is None or value == "" else value


def _tag_int(ds, name: str, default: int | None = None, required: bool = False) -> int | None:
    value = _tag(ds, name, None)
    if value is None:
        if required:
            raise InvalidImageError(f"The DICOM file lacks a valid {name}.")
        return default
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            raise TypeError("multi-valued")
        if isinstance(value, (bytes, bytearray)):
            raise TypeError("bytes")
        number = float(value)
        if not np.isfinite(number) or number != int(number):
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise InvalidImageError(f"The DICOM file has an invalid {name} ({_short(repr(value), 40)}).") from None


def _dicom_tags(ds) -> dict:
    tags = {}
    for name in _DICOM_TAGS:
        value = _tag(ds, name)
        if value is not None:
            tags[name] = _short(str(value), 64)
    try:
        ts = ds.file_meta.TransferSyntaxUID
        tags["TransferSyntaxUID"] = _short(ts.name if ts.name else str(ts), 120)
    except Exception:
        pass
    return tags


def _transfer_syntax(ds) -> str:
    try:
        return str(ds.file_meta.TransferSyntaxUID)
    except Exception:
        return ""


def _check_dicom_header(ds) -> tuple[int, int, int, int]:
    """Validate the declared geometry before any pixel is decoded; returns rows, cols, frames, samples."""
    rows = _tag_int(ds, "Rows", required=True)
    cols = _tag_int(ds, "Columns", required=True)
    if rows <= 0 or cols <= 0:
        raise InvalidImageError(f"The DICOM file declares an empty image ({cols} x {rows}).")
    _check_dims(cols, rows)
    frames = _tag_int(ds, "NumberOfFrames", 1) or 1
    if frames < 0:
        raise InvalidImageError(f"The DICOM file has an invalid NumberOfFrames ({frames}).")
    if frames > MAX_FRAMES:
        raise InvalidImageError(f"The DICOM file has {frames} frames; a single radiograph is expected.")
    samples = _tag_int(ds, "SamplesPerPixel", 1)
    allocated = _tag_int(ds, "BitsAllocated", required=True)
    stored = _tag_int(ds, "BitsStored", allocated)
    if samples not in (1, 3) or allocated not in (1, 8, 16, 32) or not 1 <= stored <= allocated:
        raise InvalidImageError(
            f"The DICOM file has an inconsistent pixel description (SamplesPerPixel {samples}, "
            f"BitsAllocated {allocated}, BitsStored {stored}).")
    photometric = str(_tag(ds, "PhotometricInterpretation", "")).strip().upper()
    expected_samples = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3,
                        "YBR_FULL_422": 3, "YBR_ICT": 3, "YBR_RCT": 3, "YBR_PARTIAL_420": 3}
    if photometric not in expected_samples:
        raise InvalidImageError(f"Unsupported DICOM photometric interpretation: {_short(photometric, 40) or 'none'}.")
    if samples != expected_samples[photometric]:
        raise InvalidImageError(
            f"The DICOM file is inconsistent: {photometric} with SamplesPerPixel {samples}.")
    if rows * cols * frames * samples * max(1, allocated // 8) > MAX_DECODED_BYTES:
        raise InvalidImageError(
            f"The DICOM file declares too much pixel data ({frames} frame(s) of {cols} x {rows}); "
            "a single radiograph is expected.")
    return rows, cols, frames, samples


def _check_deflated(data: bytes, force: bool) -> None:
    """Bound a Deflate-compressed DICOM before pydicom inflates it all in memory (a decompression bomb)."""
    import pydicom

    fp = io.BytesIO(data)
    try:
        pydicom.filereader.read_preamble(fp, force)  # advances fp past the preamble
        pydicom.filereader._read_file_meta_info(fp)
    except Exception:
        return  # not a well-formed file meta group: dcmread decides (and cannot inflate without one)
    body = data[fp.tell():]
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    head = b""
    limit = MAX_DECODED_BYTES + 16 * 2**20
    declared_checked = False
    try:
        for start in range(0, len(body), 16384):  # 16 KiB in -> at most ~17 MB out per step
            out = inflater.decompress(body[start:start + 16384])
            total += len(out)
            if not declared_checked:
                head += out
                if len(head) >= 2**20 or start + 16384 >= len(body):
                    declared_checked = True
                    try:
                        hds = pydicom.dcmread(io.BytesIO(head), force=True, stop_before_pixels=True)
                        if "Rows" in hds:
                            rows, cols, frames, samples = _check_dicom_header(hds)
                            bits = _tag_int(hds, "BitsAllocated", 16)
                            limit = min(limit, rows * cols * frames * samples * max(1, bits // 8) + 16 * 2**20)
                    except InvalidImageError:
                        raise
                    except Exception:
                        pass
                    head = b""
            if total > limit:
                raise InvalidImageError(
                    "The compressed DICOM file inflates to more data than it declares or than can be decoded "
                    "safely (a decompression bomb); it was refused.")
    except zlib.error:
        raise InvalidImageError("The compressed DICOM file is corrupt (its Deflate stream is invalid).") from None
    if not inflater.eof:
        raise InvalidImageError("The compressed DICOM file is truncated.")


def _window(arr: np.ndarray, ds) -> np.ndarray | None:
    """Apply the first VOI LUT or window as a viewer does and map its output range to 0..255;
    ``None`` when the dataset has no usable VOI transform."""
    from pydicom.pixels import apply_voi_lut

    has_lut = bool(_tag(ds, "VOILUTSequence"))
    has_window = _tag(ds, "WindowCenter") is not None and _tag(ds, "WindowWidth") is not None
    if not has_lut and not has_window:
        return None
    try:
        if has_lut:
            item = ds.VOILUTSequence[0]
            bits = int(item.LUTDescriptor[2])
            out = np.asarray(apply_voi_lut(arr, ds, index=0, prefer_lut=True), dtype=np.float64)
            y_min, y_max = 0.0, float(max(2**bits - 1, np.nanmax(out)))
        else:
            width = ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth
            if not np.isfinite(float(width)) or float(width) < 1:
                return None
            out = np.asarray(apply_voi_lut(arr, ds, index=0, prefer_lut=False), dtype=np.float64)
            # apply_windowing's output range: the stored range (BitsStored, signedness) through the rescale
            stored = int(ds.BitsStored)
            if _tag(ds, "ModalityLUTSequence"):
                y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
            elif int(ds.PixelRepresentation) == 0:
                y_min, y_max = 0.0, float(2**stored - 1)
            else:
                y_min, y_max = float(-(2 ** (stored - 1))), float(2 ** (stored - 1) - 1)
            slope, intercept = _tag(ds, "RescaleSlope"), _tag(ds, "RescaleIntercept")
            if slope is not None and intercept is not None:
                y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    except InvalidImageError:
        raise
    except Exception:  # a malformed VOI module should not hide an otherwise readable image
        return None
    if y_max == y_min or not np.isfinite(out).any():
        return None
    scaled = (np.nan_to_num(out, nan=y_min) - y_min) * (255.0 / (y_max - y_min))
    return np.round(np.clip(scaled, 0, 255)).astype(np.uint8)


def _decode_dicom(data: bytes, force: bool) -> DecodedImage:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    try:
        head = pydicom.dcmread(io.BytesIO(data), force=force, stop_before_pixels=True)
        if _transfer_syntax(head) == _DEFLATED:
            _check_deflated(data, force)
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except InvalidImageError:
        raise
    except MemoryError:
        raise InvalidImageError("The DICOM file needs more memory to read than is available.") from None
    except Exception:  # InvalidDicomError, BytesLengthException, NotImplementedError (bad VR), zlib.error, ...
        raise InvalidImageError("The DICOM file could not be read (corrupt or not DICOM).") from None
    if "PixelData" not in ds:
        raise InvalidImageError("The DICOM file holds no image (no PixelData).")
    rows, cols, frames, samples = _check_dicom_header(ds)
    tags = _dicom_tags(ds)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    try:
        arr = ds.pixel_array
    except MemoryError:
        raise InvalidImageError("The DICOM pixel data needs more memory to decode than is available.") from None
    except BaseException as err:  # pydicom and its plugins raise many types (pyo3 panics included)
        if isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise InvalidImageError(f"The DICOM pixel data could not be decoded ({_short(str(err)) or type(err).__name__}).") from None
    arr = np.asarray(arr)
    want = (rows, cols) if samples == 1 else (rows, cols, 3)
    if arr.shape[-len(want):] != want or arr.ndim not in (len(want), len(want) + 1):
        raise InvalidImageError(f"The DICOM pixel data does not match its declared size ({cols} x {rows}).")
    if arr.ndim == len(want) + 1:  # several frames: the first with content
        usable = [f for f in arr if np.ptp(f) > 0]
        if not usable:
            raise InvalidImageError("The multi-frame DICOM has no frame with image content.")
        arr = usable[0]

    if photometric.startswith("MONOCHROME"):
        stored = _tag_int(ds, "BitsStored", 16)
        if arr.dtype.kind == "u" and stored < arr.dtype.itemsize * 8:
            arr = arr & np.asarray(2**stored - 1, dtype=arr.dtype)  # bits above HighBit are not pixel data
        try:
            arr = apply_modality_lut(arr, ds)
        except Exception:  # a malformed modality LUT should not hide an otherwise readable image
            pass
        gray = _window(np.asarray(arr), ds)
        if gray is None:  # no window: stretch the stored values to 0..255
            gray = _to_uint8(np.asarray(arr))
        if photometric == "MONOCHROME1":  # 0 = white: invert so bone is bright as in MONOCHROME2
            gray = 255 - gray
        return DecodedImage(gray, "DICOM", 0.0, tags)
    if photometric == "PALETTE COLOR":
        try:
            rgb = np.asarray(apply_color_lut(arr, ds))
        except Exception as err:
            raise InvalidImageError(f"The DICOM colour palette could not be applied ({_short(str(err))}).") from None
        if rgb.dtype != np.uint8:  # 16-bit palette entries: 0..65535 (some writers use only 0..255)
            wide = rgb.size and rgb.max() > 255
            rgb = np.round(rgb.astype(np.float64) / 257.0).astype(np.uint8) if wide else rgb.astype(np.uint8)
    else:  # RGB; YBR_* arrive as RGB (pydicom and the JPEG/J2K decoders convert them)
        rgb = arr if arr.dtype == np.uint8 else _to_uint8(arr)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise InvalidImageError(f"Unsupported DICOM photometric interpretation: {photometric}.")
    gray, colour = _rgb_to_gray(rgb)
    return DecodedImage(gray, "DICOM", colour, tags)


# ---- arrays and the public entry points ---------------------------------------------------------------


def _from_array(arr: np.ndarray) -> DecodedImage:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise InvalidImageError(f"Unsupported array type: {arr.dtype}.")
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        _check_dims(arr.shape[1], arr.shape[0])
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        else:
            gray, colour = _rgb_to_gray(_to_uint8(arr[..., :3]))
            return DecodedImage(gray, "array", colour, {})
    if arr.ndim != 2:
        raise InvalidImageError(f"Expected a 2-D grayscale or H x W x C array, got shape {arr.shape}.")
    _check_dims(arr.shape[1], arr.shape[0])
    return DecodedImage(_to_uint8(arr), "array", 0.0, {})


def _decode(source) -> DecodedImage:
    if isinstance(source, DecodedImage):
        return source
    if isinstance(source, Image.Image):
        gray, colour = _pil_to_gray(source)
        return DecodedImage(gray, "PIL", colour, {})
    if isinstance(source, np.ndarray):
        return _from_array(source)
    data = _read_bytes(source)
    if _is_dicom(data):
        return _decode_dicom(data, force=False)
    try:
        return _decode_raster(data)
    except InvalidImageError as raster_err:
        if "not a recognised image" not in str(raster_err) or _unsupported_format(data):
            raise
        # a DICOM stream written without the 128-byte preamble ("raw" DICOM, older exports)
        try:
            return _decode_dicom(data, force=True)
        except InvalidImageError as dicom_err:
            if _looks_like_raw_dicom(data):
                raise dicom_err from None
            raise raster_err from None


def decode(source: ImageSource) -> DecodedImage:
    """Decode any supported input to a :class:`DecodedImage` (grey image, format, colourfulness, DICOM tags).

    Accepts bytes, a path, a binary file object, a PIL image, a numpy array or a DecodedImage (returned
    as is). Raster formats (JPEG, PNG, BMP, TIFF only) go through Pillow: EXIF orientation applied, alpha
    composited on black, >8-bit stretched to its own range. DICOM (by preamble, else as a fallback for
    unrecognised files) goes through pydicom: modality LUT, then the first VOI LUT or window mapped to
    0..255 as a viewer shows it (no window: the stored values stretched to 0..255), MONOCHROME1 inverted,
    colour converted to grey. Any problem raises :class:`InvalidImageError`; nothing else escapes.
    """
    try:
        return _decode(source)
    except InvalidImageError:
        raise
    except MemoryError:
        raise InvalidImageError("The image needs more memory to decode than is available.") from None
    except RecursionError:
        raise InvalidImageError("The file is too deeply nested to be read (corrupt or hostile).") from None
    except BaseException as err:  # last line of defence: a decoder bug must still give a clear answer
        # (Rust decoders such as pylibjpeg-rle raise pyo3 PanicException, a BaseException)
        if isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise InvalidImageError(
            f"The file could not be decoded (unexpected {type(err).__name__}); it may be corrupt.") from err


def decode_image(source: ImageSource) -> np.ndarray:
    """Decode any supported input to a full-resolution uint8 grayscale array (H x W): ``decode(source).gray``."""
    return decode(source).gray


def as_gray(image: ImageSource) -> np.ndarray:
    """``image.gray`` for a DecodedImage; ``image`` if it is already a decoded uint8 H x W array (e.g. a
    display copy, which may be smaller than the upload size limit allows, but never empty or over the
    pixel limit); else ``decode_image(image)``."""
    if isinstance(image, DecodedImage):
        return image.gray
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 2:
        if image.size == 0:
            raise InvalidImageError(f"The image is empty ({image.shape[1]} x {image.shape[0]}).")
        if image.size > MAX_PIXELS:
            _check_dims(image.shape[1], image.shape[0])
        return image
    return decode_image(image)


# --------------------------------------------------------------------------------------------
# geometry and normalisation
# --------------------------------------------------------------------------------------------


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Squash a uint8 grayscale image to size x size (bilinear, as the training copies were made)."""
    if gray.shape == (size, size):
        return gray
    return np.asarray(Image.fromarray(gray, "L").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _smoothed_levels(gray_sq: torch.Tensor, sigma: float) -> torch.Tensor:
    """uint8 levels of a Gaussian-smoothed copy (sigma in pixels, reflected edges), same shape."""
    import torch.nn.functional as F

    h, w = gray_sq.shape[-2:]
    r = min(math.ceil(3 * sigma), h - 1, w - 1)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    x = F.pad(gray_sq.reshape(-1, 1, h, w).float(), (r, r, r, r), mode="reflect")
    x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))  # separable: 2 x 13 taps, not 169
    return x.round_().clamp_(0, 255).to(torch.uint8).reshape(gray_sq.shape)


def equalize(gray_sq: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """Histogram-equalise uint8 images (..., H, W), each on its own, to float in [0, 1].

    Why: a pixel's rank within its film survives gamma, contrast, window/level and min-max stretch,
    so a model fed ranks cannot be moved by how the film was exported (only by what clips or blurs).
    ``sigma`` > 0 reads the mapping from a Gaussian-smoothed copy (sigma pixels) and applies it to the
    film itself: sharpening, noise and JPEG spread a film's histogram at fine scale, and a mapping read
    from the full-resolution histogram passes that on as a shift of whole regions (measured: a quarter
    of what sharpening still changed after spectrum matching sat in the lowest frequency ring).
    """
    shape = gray_sq.shape
    x = gray_sq.reshape(-1, shape[-2] * shape[-1]).long()
    src = x if sigma <= 0 else _smoothed_levels(gray_sq, sigma).reshape(x.shape).long()
    hist = torch.zeros(x.shape[0], 256, dtype=torch.float32).scatter_add_(1, src, torch.ones_like(src, dtype=torch.float32))
    cdf = hist.cumsum_(1)
    cdf_min = cdf.gather(1, src.min(dim=1, keepdim=True).values)  # pixels at the darkest level map to 0
    out = (cdf.gather(1, x) - cdf_min) / (x.shape[1] - cdf_min).clamp_(min=1.0)
    if sigma > 0:  # levels outside the smoothed copy's range
        out = out.clamp_(0.0, 1.0)
    return out.reshape(shape)


SPECTRUM_RINGS = 24  # frequency rings from 0 to Nyquist (one more holds the corners beyond it)
SPECTRUM_GAIN = (0.2, 5.0)  # how far a ring may be damped or boosted: detail a blur erased is not invented


@functools.lru_cache(maxsize=8)
def _rings(h: int, w: int) -> np.ndarray:
    r = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    return np.minimum((r / 0.5 * SPECTRUM_RINGS).astype(np.int64), SPECTRUM_RINGS)


def _ring_means(amp: np.ndarray, rings: np.ndarray) -> np.ndarray:
    flat = amp.reshape(-1, amp.shape[-2] * amp.shape[-1])
    counts = np.bincount(rings.ravel(), minlength=SPECTRUM_RINGS + 1)
    sums = np.stack([np.bincount(rings.ravel(), weights=row, minlength=SPECTRUM_RINGS + 1) for row in flat])
    return (sums / counts).reshape(*amp.shape[:-2], SPECTRUM_RINGS + 1).astype(np.float32)


def _spectrum(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-image mean, Fourier transform of the mean-removed image, mean amplitude per ring)."""
    a = x.detach().cpu().numpy().astype(np.float32, copy=False)
    mean = a.mean((-2, -1), keepdims=True)
    spec = np.fft.rfft2(a - mean)
    return mean, spec, _ring_means(np.abs(spec), _rings(*a.shape[-2:]))


def radial_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Mean Fourier amplitude per frequency ring of each mean-removed image: (..., H, W) -> (..., rings)."""
    return torch.from_numpy(_spectrum(x)[2])


@functools.lru_cache(maxsize=8)
def _band(h: int, w: int, band_limit: float) -> np.ndarray:
    r = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2) / 0.5  # in units of Nyquist
    band = np.exp(-0.5 * (r / band_limit) ** 2).astype(np.float32)
    band.setflags(write=False)  # cached: shared by every call
    return band


def match_spectrum(x: torch.Tensor, reference=None, band_limit: float | None = None) -> torch.Tensor:
    """Give each image the reference's amplitude per frequency ring (phases, i.e. the anatomy, untouched).

    Why: blur, sharpening and a softer device are, to first order, linear filters - they multiply the
    spectrum by a smooth radial curve. Matching the radial spectrum to the training films' mean divides
    that curve out, as equalisation divides out gamma and window/level. Gains are clamped
    (``SPECTRUM_GAIN``) so noise where a filter erased everything is not amplified. Cost: 1-2 ms per
    192 px image (numpy's single-threaded FFT), 2% of a training step here.

    ``band_limit`` (a Gaussian's sigma in units of the Nyquist frequency) then low-passes every input
    alike, in the same transform: above about half the band a softer device or a 2x down/up-sampling
    has erased the detail, and what matching would restore there is interpolation residue, which
    differs from export to export; a model that is not shown that band cannot be moved by it.
    ``reference=None`` low-passes only.
    """
    mean, spec, rings_amp = _spectrum(x)
    h, w = x.shape[-2:]
    if reference is None:
        filt = np.ones(spec.shape[-2:], dtype=np.float32)
    else:
        gain = np.clip(np.asarray(reference, dtype=np.float32) / np.maximum(rings_amp, 1e-6), *SPECTRUM_GAIN)
        gain[..., 0] = 1.0  # the lowest ring carries the film's overall layout, not its sharpness
        filt = gain[..., _rings(h, w)]
    if band_limit:
        filt = filt * _band(h, w, float(band_limit))
    out = np.fft.irfft2(spec * filt, s=(h, w)).astype(np.float32) + mean
    return torch.from_numpy(out).to(x.device)


def normalize(gray_sq: np.ndarray | torch.Tensor, mean: float, std: float, equalize_hist: bool = False,
              spectrum=None, equalize_sigma: float = 0.0, band_limit: float | None = None) -> torch.Tensor:
    """uint8 S x S (array or tensor, optionally with leading batch/channel axes) -> float 1 x S x S.

    ``equalize_hist``, ``equalize_sigma``, ``spectrum`` and ``band_limit`` are the model's own settings
    (the ``ModelMeta`` fields of those names): every caller passes them from the metadata, so training,
    evaluation and serving see the same input.
    """
    t = gray_sq if isinstance(gray_sq, torch.Tensor) else torch.from_numpy(np.array(gray_sq, dtype=np.uint8))
    if t.ndim == 2:
        t = t.unsqueeze(0)
    x = equalize(t, equalize_sigma) if equalize_hist else t.float().div_(255.0)
    if spectrum is not None or band_limit:
        x = match_spectrum(x, spectrum, band_limit)
    return (x - mean) / std


def load_square(source: ImageSource, size: int) -> np.ndarray:
    """Decode and resize: the cacheable, normalisation-free part of preprocessing."""
    return resize_square(decode_image(source), size)


def preprocess(source: ImageSource, size: int, mean: float, std: float, equalize_hist: bool = False,
               spectrum=None, equalize_sigma: float = 0.0, band_limit: float | None = None) -> torch.Tensor:
    """Any supported input -> float32 tensor 1 x size x size, normalised with the model's stats."""
    return normalize(load_square(source, size), mean, std, equalize_hist, spectrum, equalize_sigma, band_limit)
