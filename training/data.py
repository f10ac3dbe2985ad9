"""Finding, splitting and caching labelled X-rays.

Decoding and resizing a radiograph costs far more than a training step's augmentation on 2 cores, so
every image goes through ``model.load_square`` (the same function the app uses) exactly once and is
kept as a uint8 S x S array, in memory and optionally on disk keyed by file content + settings.
"""

from __future__ import annotations

import csv
import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from model.preprocessing import InvalidImageError, load_square

CLASS_NAMES = ["NORMAL", "PNEUMONIA"]
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ""}
CACHE_VERSION = "v1"  # bump when load_square's output for the same file changes

_LABEL_ALIASES = {"normal": 0, "0": 0, "negative": 0, "pneumonia": 1, "1": 1, "positive": 1}
_PATIENT_PATTERNS = [
    re.compile(r"^(person\d+)_", re.IGNORECASE),  # person1000_bacteria_2931.jpeg
    re.compile(r"^(NORMAL2-IM-\d+)-", re.IGNORECASE),  # NORMAL2-IM-1427-0001.jpeg
    re.compile(r"^(IM-\d+)-", re.IGNORECASE),  # IM-0115-0001.jpeg
]


class DataError(ValueError):
    """The dataset cannot be used for training or evaluation; raised before any work starts."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    patient: str


def patient_id(filename: str) -> str:
    """Patient id from a Kaggle chest X-ray file name; the file stem when no pattern matches."""
    name = Path(filename).name
    for pat in _PATIENT_PATTERNS:
        m = pat.match(name)
        if m:
            return m.group(1)
    return Path(name).stem


def parse_label(value: str) -> int:
    key = str(value).strip().lower()
    if key not in _LABEL_ALIASES:
        raise DataError(f"Unknown label {value!r}; expected one of NORMAL/PNEUMONIA (or 0/1).")
    return _LABEL_ALIASES[key]


def discover_folder(root: str | Path, split: str) -> list[Sample]:
    """``<root>/<split>/{NORMAL,PNEUMONIA}/*`` (the Kaggle layout)."""
    base = Path(root) / split
    if not base.is_dir():
        raise DataError(f"Data folder not found: {base} (expected <data-dir>/{split}/NORMAL and .../PNEUMONIA).")
    samples = []
    for sub in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = parse_label(sub.name)
        for f in sorted(sub.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(str(f), label, patient_id(f.name)))
    return check_samples(samples, str(base))


def read_manifest(csv_path: str | Path) -> list[Sample]:
    """CSV with columns ``path,label[,patient_id]``; relative paths are relative to the CSV."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"Manifest not found: {csv_path}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower() for c in reader.fieldnames or []}
        if not {"path", "label"} <= cols:
            raise DataError(f"{csv_path} needs a header with at least 'path,label' (found {sorted(cols)}).")
        samples = []
        for i, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            path = Path(row["path"])
            path = path if path.is_absolute() else csv_path.parent / path
            try:
                label = parse_label(row["label"])
            except DataError as err:
                raise DataError(f"{csv_path}:{i}: {err}") from None
            samples.append(Sample(str(path), label, row.get("patient_id") or patient_id(path.name)))
    missing = [s.path for s in samples if not Path(s.path).is_file()]
    if missing:
        raise DataError(f"{len(missing)} file(s) listed in {csv_path} do not exist, e.g. {missing[0]}")
    return check_samples(samples, str(csv_path))


def check_samples(samples: list[Sample], where: str) -> list[Sample]:
    if not samples:
        raise DataError(f"No images found in {where}.")
    present = {s.label for s in samples}
    if len(present) < 2:
        only = CLASS_NAMES[next(iter(present))]
        raise DataError(f"{where} holds only {only} images; both NORMAL and PNEUMONIA are needed.")
    return samples


def load_samples(data_dir: str | Path | None, split: str = "train", manifest: str | Path | None = None) -> list[Sample]:
    if manifest:
        return read_manifest(manifest)
    if data_dir is None:
        raise DataError("Give --data-dir (Kaggle layout) or --manifest (CSV).")
    return discover_folder(data_dir, split)


def grouped_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified split that keeps every patient's images on one side."""
    if not 0.0 < val_fraction < 0.5:
        raise DataError("--val-fraction must be in (0, 0.5).")
    n_splits = max(2, round(1.0 / val_fraction))
    y = np.array([s.label for s in samples])
    groups = np.array([s.patient for s in samples])
    if len(set(groups)) < n_splits:
        raise DataError(f"Only {len(set(groups))} patients: too few for a patient-grouped validation split.")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(y)), y, groups))
    train, val = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
    check_samples(val, "the validation split")
    check_samples(train, "the training split")
    return train, val


def write_split(path: str | Path, train: list[Sample], val: list[Sample], root: str | Path | None = None) -> None:
    def rel(p: str) -> str:
        if root is None:
            return p
        try:
            return str(Path(p).resolve().relative_to(Path(root).resolve()))
        except ValueError:
            return p

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subset", "path", "label", "patient_id"])
        for subset, items in (("train", train), ("val", val)):
            for s in sorted(items, key=lambda s: s.path):
                w.writerow([subset, rel(s.path), CLASS_NAMES[s.label], s.patient])


def read_split(path: str | Path, subset: str, root: str | Path | None = None) -> list[Sample]:
    """Samples of one subset of a split file written by :func:`write_split`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Split file not found: {path}")
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["subset"] == subset]
    samples = []
    for r in rows:
        p = Path(r["path"])
        if not p.is_absolute() and root is not None:
            p = Path(root) / p
        samples.append(Sample(str(p), parse_label(r["label"]), r["patient_id"]))
    return check_samples(samples, f"{path} [{subset}]")


# ------------------------------------------------------------------------------------------------
# cache of preprocessed uint8 images
# ------------------------------------------------------------------------------------------------


def _cache_key(data: bytes, size: int) -> str:
    return hashlib.sha1(data).hexdigest() + f"-{size}-{CACHE_VERSION}"


def _load_one(sample: Sample, size: int, cache_dir: Path | None) -> np.ndarray | str:
    try:
        data = Path(sample.path).read_bytes()
    except OSError as err:
        return f"{sample.path}: {err}"
    cached = None
    if cache_dir is not None:
        key = _cache_key(data, size)
        cached = cache_dir / key[:2] / f"{key}.npy"
        if cached.is_file():
            try:
                arr = np.load(cached, allow_pickle=False)
                if arr.shape == (size, size) and arr.dtype == np.uint8:
                    return arr
            except (OSError, ValueError):
                pass
    try:
        arr = load_square(data, size)
    except InvalidImageError as err:
        return f"{sample.path}: {err}"
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp.npy")
            np.save(tmp, arr, allow_pickle=False)
            tmp.replace(cached)
        except OSError:
            pass  # a read-only or full cache must not stop training
    return arr


def load_images(
    samples: list[Sample], size: int, cache_dir: str | Path | None = None, workers: int = 2, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[Sample], list[str]]:
    """Preprocess every sample once. Returns (uint8 N x 1 x S x S, labels, kept samples, skipped reasons).

    Unreadable images are skipped and reported, never fatal.
    """
    from tqdm.auto import tqdm

    cache = Path(cache_dir) if cache_dir else None
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(
            tqdm(
                pool.map(lambda s: _load_one(s, size, cache), samples),
                total=len(samples), desc=f"decode {size}px", disable=not progress, leave=False,
            )
        )
    kept, arrays, skipped = [], [], []
    for s, r in zip(samples, results):
        if isinstance(r, str):
            skipped.append(r)
        else:
            kept.append(s)
            arrays.append(r)
    if not kept:
        raise DataError(f"None of the {len(samples)} images could be read; first error: {skipped[0]}")
    images = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
    labels = torch.tensor([s.label for s in kept], dtype=torch.long)
    return images, labels, kept, skipped


class XrayTensorDataset(torch.utils.data.Dataset):
    """Cached uint8 images -> (normalised float tensor, label), augmenting on tensors.

    With ``perturb`` and ``views=2`` an item is a pair (1 x S x S each, stacked): the film after the
    geometric ``transform``, and the same film exported differently by ``perturb``. Training asks the
    model to score both alike (consistency), which targets invariance to acquisition directly.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, normalize_fn, transform=None, perturb=None,
                 views: int = 1):
        self.images, self.labels, self.normalize = images, labels, normalize_fn
        self.transform, self.perturb, self.views = transform, perturb, views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        if self.views == 2:
            return torch.stack([self.normalize(img), self.normalize(self.perturb(img))]), self.labels[i]
        if self.perturb is not None:
            img = self.perturb(img)
        return self.normalize(img), self.labels[i]


def train_transform(size: int):
    """X-ray-appropriate geometric augmentation: small jitter, no flips (the heart's side is anatomy,
    and vertical flips never occur in practice). Exposure is ``AcquisitionPerturb``'s job."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.85, 1.18), antialias=True),
            v2.RandomAffine(degrees=10, translate=(0.04, 0.04)),
        ]
    )


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur whose kernel spans +-3 sigma: a fixed 7-tap kernel cuts sigma 2 down to an effective 1.64,
    so the unsharp masks training saw were narrower than a console's (or PIL's UnsharpMask radius 2)."""
    from torchvision.transforms.v2 import functional as TF

    return TF.gaussian_blur(x, kernel_size=2 * int(np.ceil(3 * sigma)) + 1, sigma=sigma)


# How devices and export tools shrink an image: box averaging, or antialiased (triangle / cubic) filters as
# PIL's and most viewers' resize use (box alone was trained until v5; v6, trained on all three among other
# changes, cut the 2x PIL down/up-sampling max from 0.122 to 0.093: docs/recipes.md).
RESAMPLERS = ({"mode": "area"}, {"mode": "bilinear", "antialias": True, "align_corners": False},
              {"mode": "bicubic", "antialias": True, "align_corners": False})


class AcquisitionPerturb:
    """The same film as another device or export would have made it (uint8 1 x S x S in and out).

    Each step fires with probability ``p``: softness (blur or 1.5-3x down/up-sampling), sharpening,
    gamma, contrast and window/level (clipping), noise, JPEG re-compression. Randomness comes from
    torch's global generator, which training seeds per epoch (resumable, deterministic).
    """

    def __init__(self, p: float = 0.35):
        self.p = p

    def _fires(self) -> bool:
        return float(torch.rand(())) < self.p

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F
        from torchvision.io import decode_jpeg, encode_jpeg

        x = img.float().unsqueeze(0)  # 1 x 1 x S x S, 0..255
        size = x.shape[-2:]
        if self._fires():  # a softer device: lower resolution, then back
            f = _uniform(1.5, 3.0)
            small = (max(8, round(size[0] / f)), max(8, round(size[1] / f)))
            down = RESAMPLERS[int(torch.randint(len(RESAMPLERS), ()))]
            x = F.interpolate(F.interpolate(x, small, **down), size, mode="bilinear", align_corners=False)
        elif self._fires():
            x = gaussian_blur(x, _uniform(0.4, 1.5))
        if self._fires():  # unsharp masking, as many consoles apply
            x = x + _uniform(0.3, 1.0) * (x - gaussian_blur(x, _uniform(0.8, 2.5)))
        x = x.clamp(0, 255) / 255.0
        if self._fires():
            x = x.pow(float(torch.exp(torch.empty(()).uniform_(-0.4, 0.4))))  # gamma ~0.67..1.49
        if self._fires():
            m = x.mean()
            x = (x - m) * _uniform(0.7, 1.3) + m + _uniform(-0.08, 0.08)
        if self._fires():  # window/level: clip a little at either end and stretch
            lo, hi = _uniform(0.0, 0.12), _uniform(0.88, 1.0)
            x = (x - lo) / (hi - lo)
        if self._fires():
            x = x + torch.randn_like(x) * _uniform(0.005, 0.03)
        out = (x.clamp(0, 1) * 255).round().to(torch.uint8)[0]
        if self._fires():
            out = decode_jpeg(encode_jpeg(out, quality=int(_uniform(40, 95))))
        return out
