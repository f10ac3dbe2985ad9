"""The model artifact: a directory holding ``weights.safetensors`` and ``model.json``.

``model.json`` is the single source of truth for everything needed to use the weights correctly
(architecture, input size, normalisation, class names, calibration temperature, thresholds) and
for what is known about them (training summary, validation metrics), plus the sha256 of the weights
file so a swapped or corrupted file is refused. safetensors means loading never unpickles code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .registry import create_model, get_spec

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"
REPORT_FILE = "report.json"
HISTORY_FILE = "history.json"
SPLIT_FILE = "split.csv"
MAX_JSON_BYTES = 64 * 1024 * 1024  # companion JSON files (report, history) larger than this are refused unread


class ModelArtifactError(RuntimeError):
    """The artifact directory is missing, incomplete, tampered with or inconsistent."""


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class ModelMeta:
    architecture: str
    input_size: int
    mean: float
    std: float
    class_names: list[str] = field(default_factory=lambda: ["NORMAL", "PNEUMONIA"])
    positive_class: str = "PNEUMONIA"
    in_chans: int = 1
    equalize: bool = False  # histogram-equalise each input before mean/std (see preprocessing.equalize)
    spectrum: list[float] | None = None  # reference amplitude per frequency ring (preprocessing.match_spectrum); None: off
    equalize_sigma: float = 0.0  # equalisation mapping read from a copy smoothed by this many pixels; 0: the film itself
    band_limit: float | None = None  # Gaussian low-pass, sigma in units of Nyquist (preprocessing.match_spectrum); None: off
    temperature: float = 1.0  # calibration: P = sigmoid((logit_pos - logit_neg) / temperature + bias)
    bias: float = 0.0
    threshold: float = 0.5
    operating_points: dict[str, float] = field(default_factory=dict)
    name: str = ""
    created: str = ""
    resize: str = "squash, bilinear (as the training copies were made)"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)  # input gate: threshold, figures, gate.safetensors checksum
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)

    @property
    def prevalence(self) -> float | None:
        """The share of positives among the films the calibration was fitted on (``metrics.prevalence``):
        the class mix its probabilities hold for. None where the artifact does not say or says no proportion."""
        v = self.metrics.get("prevalence") if isinstance(self.metrics, dict) else None
        return float(v) if _finite(v) and 0 < v < 1 else None

    def normalize(self, gray_sq):
        """The model's input normalisation, from its own metadata (the one call every path makes)."""
        from .preprocessing import normalize

        return normalize(gray_sq, self.mean, self.std, self.equalize, self.spectrum, self.equalize_sigma, self.band_limit)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelMeta":
        if not isinstance(d, dict):
            raise ModelArtifactError(f"{META_FILE} must hold a JSON object.")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelArtifactError(
                f"{META_FILE} has format_version {version!r}; this code reads version {FORMAT_VERSION}."
            )
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("architecture", "input_size", "mean", "std", "weights_sha256") if k not in d]
        if missing:
            raise ModelArtifactError(f"{META_FILE} lacks required fields: {', '.join(missing)}.")
        meta = cls(**{k: v for k, v in d.items() if k in known})
        get_spec(meta.architecture)  # unknown architecture -> ValueError with the list
        if meta.num_classes != 2:
            raise ModelArtifactError(f"Only binary classifiers are supported (got classes {meta.class_names}).")
        if meta.spectrum is not None:
            from .preprocessing import SPECTRUM_RINGS

            ok = isinstance(meta.spectrum, list) and len(meta.spectrum) == SPECTRUM_RINGS + 1 and all(
                _finite(v) and v > 0 for v in meta.spectrum)
            if not ok:
                raise ModelArtifactError(f"{META_FILE}: spectrum must be {SPECTRUM_RINGS + 1} positive numbers.")
        if not (_finite(meta.equalize_sigma) and 0 <= meta.equalize_sigma <= 16):
            raise ModelArtifactError(f"{META_FILE}: equalize_sigma must be a number from 0 to 16 (pixels).")
        if meta.band_limit is not None and not (_finite(meta.band_limit) and 0 < meta.band_limit <= 4):
            raise ModelArtifactError(f"{META_FILE}: band_limit must be null or a number in (0, 4] (units of Nyquist).")
        if meta.positive_class not in meta.class_names:
            raise ModelArtifactError(f"positive_class {meta.positive_class!r} is not among {meta.class_names}.")
        return meta


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask's set-and-restore races with other threads)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """``safetensors.save_file`` with the permissions of any other file written here.

    safetensors writes through a private temporary file and keeps its mode (0600): weights that the
    account serving the app (or a container's non-root user) could not read. The umask decides, as
    for model.json."""
    save_file(tensors, str(path))
    os.chmod(path, 0o666 & ~_umask())


def save_artifact(directory: str | Path, net: nn.Module, meta: ModelMeta) -> Path:
    """Write weights and metadata; the checksum in ``meta`` is filled in from the written file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    save_tensors(state, weights)  # no header metadata: model.json holds it, and bytes stay reproducible
    meta.weights_sha256 = sha256_file(weights)
    (directory / META_FILE).write_text(meta.to_json())
    return directory


def read_meta(directory: str | Path) -> ModelMeta:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ModelArtifactError(f"No {META_FILE} in {Path(directory)}: not a model directory.")
    try:
        return ModelMeta.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ModelArtifactError(f"{path} is not valid JSON ({err}).") from None
    except (TypeError, ValueError) as err:
        raise ModelArtifactError(f"{path} is invalid: {err}") from None


def load_artifact(directory: str | Path) -> tuple[nn.Module, ModelMeta]:
    """Rebuild the network from ``model.json`` and load verified weights into it (eval mode, CPU)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelArtifactError(f"Model directory not found: {directory}")
    meta = read_meta(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelArtifactError(f"No {WEIGHTS_FILE} in {directory}.")
    digest = sha256_file(weights)
    if digest != meta.weights_sha256:
        raise ModelArtifactError(
            f"{WEIGHTS_FILE} does not match the checksum recorded in {META_FILE} "
            f"(expected {meta.weights_sha256[:12]}..., found {digest[:12]}...). "
            "The file was modified or belongs to another model; refusing to load it."
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ModelArtifactError(f"{WEIGHTS_FILE} could not be read: {err}") from None
    net = create_model(meta.architecture, num_classes=meta.num_classes, in_chans=meta.in_chans)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelArtifactError(
            f"The weights do not fit architecture {meta.architecture!r}: {str(err).splitlines()[0]}"
        ) from None
    return net.eval(), meta


def read_json(directory: str | Path, name: str) -> dict | list | None:
    """Optional companion files (report, history); ``None`` when absent."""
    path = Path(directory) / name
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ModelArtifactError(f"{name} is larger than {MAX_JSON_BYTES // 2**20} MB; refusing to read it.")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelArtifactError(f"{name} is not valid JSON ({err}).") from None
    except RecursionError:
        raise ModelArtifactError(f"{name} is not usable: its JSON is nested too deeply.") from None


def torch_device(preferred: str | None = None) -> torch.device:
    if preferred and preferred != "auto":
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
