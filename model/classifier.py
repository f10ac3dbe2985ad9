"""The public inference API: ``load_model`` -> ``Classifier`` -> probabilities and heatmaps.

Thread safety: Streamlit serves every session from one cached ``Classifier``. Prediction runs under
``torch.inference_mode`` on a network that never carries hooks, so it is safe to call concurrently.
pytorch-grad-cam works by registering forward hooks on the target layer, which would capture the
activations of *any* forward pass through that layer, so CAMs run on a private copy of the network,
one at a time under a lock.
"""

from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .gate import UNCHECKED, InputCheck
from .artifact import HISTORY_FILE, REPORT_FILE, ModelMeta, load_artifact, read_json, torch_device
from .preprocessing import ImageSource, as_gray, normalize, resize_square
from .registry import cam_target_layer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "model"
MODEL_DIR_ENV = "CXR_MODEL_DIR"

CAM_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
}
CAM_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "eigencam": "EigenCAM", "layercam": "LayerCAM"}


@dataclass
class Prediction:
    """One image's probability and input check, both from the same forward pass."""

    probability: float  # calibrated P(positive class)
    check: InputCheck  # flagged -> the model was not made for this image: do not use the probability


@dataclass
class Analysis:
    """One image's result from a single fused forward/backward pass."""

    probability: float  # calibrated P(positive class)
    heatmap: np.ndarray  # H x W float32 in [0, 1], at the decoded image's size
    image: np.ndarray  # H x W uint8 grayscale, as decoded (for display / overlay)
    check: InputCheck = UNCHECKED


def calibrated_probs(logits: torch.Tensor, temperature=1.0, bias=0.0, positive_index: int = 1, as_numpy: bool = True):
    """P(positive) = sigmoid(margin / T + b), margin = positive logit - the other logit.

    With b = 0 this equals softmax(logits / T) for two classes; T and b are fitted on the validation
    split after training (see training/calibration.py).
    """
    logits = logits.float()
    margin = logits[:, positive_index] - logits[:, 1 - positive_index]
    p = torch.sigmoid(margin / temperature + bias)
    return p.detach().cpu().numpy().astype(np.float64) if as_numpy else p


def default_model_dir() -> Path:
    return Path(os.environ.get(MODEL_DIR_ENV) or DEFAULT_MODEL_DIR)


class Classifier:
    def __init__(self, net: torch.nn.Module, meta: ModelMeta, directory: Path | None = None, device: str | None = None):
        self.meta = meta
        self.directory = directory
        self.device = torch_device(device)
        self._net = net.to(self.device).eval()
        if self.device.type == "cuda":
            self._net = self._net.to(memory_format=torch.channels_last)
        for p in self._net.parameters():
            p.requires_grad_(False)
        self._cam_net: torch.nn.Module | None = None
        self._cams: dict = {}
        self._cam_lock = threading.Lock()

    # ---- metadata ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.meta.name or self.meta.architecture

    @property
    def threshold(self) -> float:
        return self.meta.threshold

    def report(self) -> dict | None:
        return read_json(self.directory, REPORT_FILE) if self.directory else None

    def history(self) -> list | dict | None:
        return read_json(self.directory, HISTORY_FILE) if self.directory else None

    # ---- preprocessing ----------------------------------------------------------------------
    def to_tensor(self, gray: np.ndarray) -> torch.Tensor:
        """Decoded grayscale image -> normalised model input (1 x S x S)."""
        return normalize(resize_square(gray, self.meta.input_size), self.meta.mean, self.meta.std)

    def _probs(self, logits: torch.Tensor, calibrated: bool = True) -> np.ndarray:
        if calibrated:
            return calibrated_probs(logits, self.meta.temperature, self.meta.bias, self.meta.positive_index)
        return calibrated_probs(logits, 1.0, 0.0, self.meta.positive_index)

    # ---- prediction -------------------------------------------------------------------------
    def logits(self, batch: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Preprocessed N x C x S x S tensor -> raw logits (N x classes, CPU, before temperature)."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(batch), batch_size):
                x = batch[i : i + batch_size].to(self.device, non_blocking=True)
                if self.device.type == "cuda":
                    x = x.to(memory_format=torch.channels_last)
                out.append(self._net(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.meta.num_classes)

    def predict_tensor(self, batch: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Preprocessed N x C x S x S tensor -> calibrated P(positive) per row."""
        return self._probs(self.logits(batch, batch_size))

    def predict_proba(self, images: ImageSource | Sequence[ImageSource], batch_size: int = 32) -> np.ndarray:
        """P(pneumonia) for one image or a sequence of images (bytes, paths, PIL, arrays)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        batch = torch.stack([self.to_tensor(as_gray(img)) for img in images]) if images else torch.zeros(0)
        return self.predict_tensor(batch, batch_size)

    def predict(self, images: ImageSource | Sequence[ImageSource], batch_size: int = 32) -> list[Prediction]:
        """Probability and input check per image, from one forward pass (the public batched form)."""
        probs = self.predict_proba(images, batch_size)
        return [Prediction(float(p), UNCHECKED) for p in probs]

    def check_input(self, image: ImageSource) -> InputCheck:
        """Is this an image the model can read? (See model.gate.)"""
        return self.predict([image])[0].check

    def check_inputs(self, images: Sequence[ImageSource], batch_size: int = 32) -> list[InputCheck]:
        return [p.check for p in self.predict(list(images), batch_size)]

    # ---- explanation ------------------------------------------------------------------------
    def _cam(self, method: str):
        import pytorch_grad_cam

        if method not in CAM_METHODS:
            raise ValueError(f"Unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}.")
        if self._cam_net is None:
            self._cam_net = copy.deepcopy(self._net)
            for p in self._cam_net.parameters():
                p.requires_grad_(True)
        if method not in self._cams:
            cls = getattr(pytorch_grad_cam, CAM_METHODS[method])
            layer = cam_target_layer(self._cam_net, self.meta.architecture)
            self._cams[method] = cls(model=self._cam_net, target_layers=[layer])
        return self._cams[method]

    def _target_index(self, target: str | int) -> int:
        if isinstance(target, int):
            return target
        names = [c.lower() for c in self.meta.class_names]
        if target.lower() not in names:
            raise ValueError(f"Unknown target {target!r}; classes are {self.meta.class_names}.")
        return names.index(target.lower())

    def analyze(self, image: ImageSource, method: str = "gradcam", target: str | int = "pneumonia") -> Analysis:
        """Decode once, then probability and heatmap from the same forward pass."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        gray = as_gray(image)
        x = self.to_tensor(gray).unsqueeze(0).to(self.device)
        idx = self._target_index(target)
        with self._cam_lock:
            cam = self._cam(method)
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(idx)])
            prob = float(self._probs(cam.outputs)[0])
            cam.activations_and_grads.clear()
        heat = np.nan_to_num(maps[0].astype(np.float32), nan=0.0)
        h, w = gray.shape
        if heat.shape != (h, w):
            heat = np.asarray(Image.fromarray(heat, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)
        return Analysis(probability=prob, heatmap=np.clip(heat, 0.0, 1.0), image=gray)

    def explain(self, image: ImageSource, method: str = "gradcam", target: str | int = "pneumonia") -> np.ndarray:
        """Heatmap (H x W, [0, 1], at the input image's size) of where the model looked."""
        return self.analyze(image, method, target).heatmap


def load_model(path: str | Path | None = None, device: str | None = None) -> Classifier:
    """Load a model artifact; default: ``$CXR_MODEL_DIR`` or the shipped ``assets/model``."""
    directory = Path(path) if path is not None else default_model_dir()
    net, meta = load_artifact(directory)
    return Classifier(net, meta, directory=directory, device=device)


def overlay(image: ImageSource, heatmap: np.ndarray, opacity: float = 0.4) -> np.ndarray:
    """Blend a jet-coloured heatmap over the image; returns H x W x 3 uint8 RGB."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    gray = as_gray(image)
    h, w = gray.shape
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != (h, w):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)
    opacity = float(np.clip(opacity, 0.0, 1.0))
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32) / 255.0
    if opacity == 0.0:
        return (rgb * 255).round().astype(np.uint8)
    return show_cam_on_image(rgb, np.clip(heat, 0, 1), use_rgb=True, image_weight=1.0 - opacity)
