"""The one preprocessing path shared by training, evaluation and the app.

Three stages, each usable alone so callers can cache or display intermediate results:

    decode_image(source)          -> uint8 grayscale H x W   (full resolution, display-ready)
    resize_square(gray, size)     -> uint8 grayscale S x S   (what the training cache stores)
    normalize(gray_sq, mean, std, equalize_hist) -> float32 tensor 1 x S x S  (optionally rank-equalised first)

``preprocess`` chains them. Any decoding problem raises :class:`InvalidImageError` with a message a
person can act on; nothing else escapes for bad input.

Resizing squashes to S x S (aspect ratio not kept) with bilinear interpolation, because the shared
training copies were produced exactly that way; padding or cropping at inference would be a
train/serve skew.
"""

from __future__ import annotations

import io
import os
import warnings
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

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike, IO[bytes], Image.Image, np.ndarray]


class InvalidImageError(ValueError):
    """The input cannot be used as a chest X-ray; ``str(err)`` is written for the end user."""


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


def _read_bytes(source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
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
        if len(data) > MAX_FILE_BYTES:
            raise InvalidImageError(f"The file is larger than {MAX_FILE_BYTES // 2**20} MB.")
    else:
        raise InvalidImageError(f"Unsupported input type: {type(source).__name__}.")
    if not data:
        raise InvalidImageError("The file is empty.")
    return data


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


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
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        raise InvalidImageError("The image contains no valid pixel values.")
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    arr = np.where(finite, arr, lo)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _pil_to_gray(im: Image.Image) -> np.ndarray:
    _check_dims(*im.size)
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF must not make an otherwise fine image unusable
        pass
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _to_uint8(np.asarray(im))
    if mode == "1":
        im = im.convert("L")
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, rgba).convert("L")
    elif mode != "L":
        im = im.convert("RGB").convert("L")  # CMYK, YCbCr, P, RGB, LAB ... through RGB
    return np.asarray(im, dtype=np.uint8)


def _decode_raster(data: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            _check_dims(*im.size)  # header only: refuse bombs before decoding pixels
            im.load()
        except InvalidImageError:
            raise
        except UnidentifiedImageError:
            raise InvalidImageError(
                "This file is not a recognised image (supported: JPEG, PNG, BMP, TIFF, DICOM)."
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InvalidImageError(
                f"The image is too large: it declares more pixels than can be decoded safely (limit {MAX_PIXELS / 1e6:.0f} megapixels)."
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            msg = str(err)
            if "truncated" in msg or "broken data stream" in msg or isinstance(err, EOFError):
                raise InvalidImageError("The image file is truncated or corrupt.") from None
            raise InvalidImageError(f"The image could not be decoded ({msg or type(err).__name__}).") from None
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        return _pil_to_gray(im)


def _decode_dicom(data: bytes, force: bool) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InvalidImageError("The DICOM file could not be read (corrupt or not DICOM).") from None
    if "PixelData" not in ds:
        raise InvalidImageError("The DICOM file holds no image (no PixelData).")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise InvalidImageError("The DICOM file lacks valid Rows/Columns.") from None
    _check_dims(cols, rows)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 64:
        raise InvalidImageError(f"The DICOM file has {frames} frames; a single radiograph is expected.")
    try:
        arr = ds.pixel_array
    except Exception as err:  # pydicom raises many types for bad/unsupported pixel data
        raise InvalidImageError(f"The DICOM pixel data could not be decoded ({err}).") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if frames > 1 or (arr.ndim == 3 and photometric.startswith("MONOCHROME")):
        usable = [f for f in arr if np.ptp(f) > 0]
        if not usable:
            raise InvalidImageError("The multi-frame DICOM has no frame with image content.")
        arr = usable[0]
    if photometric.startswith("MONOCHROME"):
        try:
            arr = apply_modality_lut(arr, ds)
            arr = apply_voi_lut(arr, ds, index=0)
        except Exception:  # a malformed LUT should not hide an otherwise readable image
            pass
        arr = _to_uint8(np.asarray(arr))
        if photometric == "MONOCHROME1":  # 0 = white: invert so bone is bright as in MONOCHROME2
            arr = 255 - arr
        return arr
    # colour DICOM (secondary captures): pydicom converts YBR to RGB by default
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise InvalidImageError(f"Unsupported DICOM photometric interpretation: {photometric}.")
    return _pil_to_gray(Image.fromarray(_to_uint8(arr[..., :3])))


def _from_array(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        else:
            rgb = _to_uint8(arr[..., :3])
            return _pil_to_gray(Image.fromarray(rgb, "RGB"))
    if arr.ndim != 2:
        raise InvalidImageError(f"Expected a 2-D grayscale or H x W x C array, got shape {arr.shape}.")
    _check_dims(arr.shape[1], arr.shape[0])
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return _to_uint8(arr)


def decode_image(source: ImageSource) -> np.ndarray:
    """Decode any supported input to a full-resolution uint8 grayscale array (H x W).

    Accepts bytes, a path, a binary file object, a PIL image or a numpy array. Raster formats go
    through Pillow (EXIF orientation applied, alpha composited on black, >8-bit windowed to its
    own range); DICOM (by preamble, else as a fallback for unrecognised files) goes through pydicom
    with modality LUT, first VOI LUT/window and MONOCHROME1 inversion.
    """
    if isinstance(source, Image.Image):
        return _pil_to_gray(source)
    if isinstance(source, np.ndarray):
        return _from_array(source)
    data = _read_bytes(source)
    if _is_dicom(data):
        return _decode_dicom(data, force=False)
    try:
        return _decode_raster(data)
    except InvalidImageError as raster_err:
        if "not a recognised image" not in str(raster_err):
            raise
        # extensionless DICOM written without the 128-byte preamble
        try:
            return _decode_dicom(data, force=True)
        except InvalidImageError:
            raise raster_err from None


def as_gray(image: ImageSource) -> np.ndarray:
    """``image`` if it is already a decoded uint8 H x W array (e.g. a display copy, which may be
    smaller than the upload limits allow), else ``decode_image(image)``."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 2:
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


def equalize(gray_sq: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise uint8 images (..., H, W), each on its own, to float in [0, 1].

    Why: a pixel's rank within its film survives gamma, contrast, window/level and min-max stretch,
    so a model fed ranks cannot be moved by how the film was exported (only by what clips or blurs).
    """
    shape = gray_sq.shape
    x = gray_sq.reshape(-1, shape[-2] * shape[-1]).long()
    hist = torch.zeros(x.shape[0], 256, dtype=torch.float32).scatter_add_(1, x, torch.ones_like(x, dtype=torch.float32))
    cdf = hist.cumsum_(1)
    cdf_min = cdf.gather(1, x.min(dim=1, keepdim=True).values)  # pixels at the darkest level map to 0
    out = (cdf.gather(1, x) - cdf_min) / (x.shape[1] - cdf_min).clamp_(min=1.0)
    return out.reshape(shape)


def normalize(gray_sq: np.ndarray | torch.Tensor, mean: float, std: float, equalize_hist: bool = False) -> torch.Tensor:
    """uint8 S x S (array or tensor, optionally with leading batch/channel axes) -> float 1 x S x S.

    ``equalize_hist`` is the model's own setting (``ModelMeta.equalize``): every caller passes it
    from the metadata, so training, evaluation and serving see the same input.
    """
    t = gray_sq if isinstance(gray_sq, torch.Tensor) else torch.from_numpy(np.array(gray_sq, dtype=np.uint8))
    if t.ndim == 2:
        t = t.unsqueeze(0)
    x = equalize(t) if equalize_hist else t.float().div_(255.0)
    return (x - mean) / std


def load_square(source: ImageSource, size: int) -> np.ndarray:
    """Decode and resize: the cacheable, normalisation-free part of preprocessing."""
    return resize_square(decode_image(source), size)


def preprocess(source: ImageSource, size: int, mean: float, std: float, equalize_hist: bool = False) -> torch.Tensor:
    """Any supported input -> float32 tensor 1 x size x size, normalised with the model's stats."""
    return normalize(load_square(source, size), mean, std, equalize_hist)
