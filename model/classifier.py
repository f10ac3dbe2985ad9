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

from .fuse import fold_batchnorm
from .gate import UNCHECKED, Gate, InputCheck, gate_layers, pooled, rule_reason
from .artifact import HISTORY_FILE, REPORT_FILE, ModelMeta, load_artifact, read_json, torch_device
from .preprocessing import ImageSource, as_gray, decode, resize_square
from .registry import cam_target_layer, get_spec

# architectures whose CAM layer feeds global average pooling and one linear layer directly, where
# Grad-CAM at that layer needs no backward pass (see Classifier._class_activation_map)
FAST_CAM_ARCHITECTURES = {"resnet18", "resnet50"}
FAST_CAM_METHODS = ("gradcam", "gradcam++")  # at the last block: from the forward pass, no backward

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "model"
MODEL_DIR_ENV = "CXR_MODEL_DIR"

CAM_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
}
CAM_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "eigencam": "EigenCAM", "layercam": "LayerCAM"}
# The most faithful method for the shipped model by ROAD (docs/faithfulness.md), and free: no backward pass
DEFAULT_CAM_METHOD = "gradcam"


@dataclass
class Prediction:
    """One image's probability and input check, both from the same forward pass."""

    probability: float  # calibrated P(positive class)
    check: InputCheck  # flagged -> the model was not made for this image: do not use the probability
    heatmap: np.ndarray | None = None  # S x S in [0, 1] at the model's input size (predict(heatmaps=True))


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


def _decoded(image) -> tuple[np.ndarray, float, dict]:
    """(uint8 gray, colourfulness, technical DICOM tags) of any accepted input."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 2:
        gray = as_gray(image)  # already decoded (a display copy or a model-input square): checked, not copied
        return gray, 0.0, {}
    d = decode(image)
    return d.gray, float(d.colorfulness), dict(d.dicom or {})


def _fast_bf16(device: torch.device) -> bool:
    """bf16 only where the hardware runs it natively (~2x); elsewhere (AVX2-only CPUs) it
    is ~10x slower than fp32, measured."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Classifier:
    def __init__(self, net: torch.nn.Module, meta: ModelMeta, directory: Path | None = None, device: str | None = None,
                 gate: Gate | None = None, bf16: bool | None = None, fold_bn: bool = True):
        self.meta = meta
        self.directory = directory
        self.device = torch_device(device)
        self.gate = gate
        if bf16 is None:  # CXR_BF16=0/1 overrides the hardware's choice for every classifier, however built
            env = os.environ.get("CXR_BF16", "").strip()
            bf16 = env == "1" if env in ("0", "1") else _fast_bf16(self.device)
        self.bf16 = bf16
        net = source = net.to(self.device).eval()
        if fold_bn:  # same outputs (checked on a probe), ~1.1-1.2x faster on CPU: see model/fuse.py
            probe = torch.randn(2, meta.in_chans, meta.input_size, meta.input_size, generator=torch.Generator().manual_seed(0))
            net, _ = fold_batchnorm(net, probe.to(self.device))
        if self.bf16:  # weights stored in bf16: autocast re-casts every weight on every call
            # (forward 1.02-1.04x idle, 1.26x beside a training run; interleaved). Folding already made a copy;
            # otherwise copy, so the caller's network keeps its fp32 weights.
            net = (copy.deepcopy(net) if net is source else net).to(torch.bfloat16)
        self._net = net.to(memory_format=torch.channels_last)
        for p in self._net.parameters():
            p.requires_grad_(False)
        self._cam_net: torch.nn.Module | None = None
        self._cams: dict = {}
        self._cam_lock = threading.Lock()
        # taps: activations the gate and the fast CAM read, captured by forward hooks into storage
        # private to the calling thread, so concurrent predictions never see each other's tensors
        self._local = threading.local()
        spec = get_spec(meta.architecture)
        self._tap_layers = sorted(set((gate.layers if gate else gate_layers(meta.architecture)) + [spec.cam_layer]))
        for name in self._tap_layers:
            self._net.get_submodule(name).register_forward_hook(self._tap(name))
        self._fast_cam = meta.architecture in FAST_CAM_ARCHITECTURES
        self._head = self._net.get_submodule(spec.classifier) if self._fast_cam else None

    def _tap(self, name: str):
        def hook(_module, _inputs, output):
            store = getattr(self._local, "store", None)
            if store is not None:
                store[name] = output
        return hook

    # ---- metadata ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.meta.name or self.meta.architecture

    @property
    def threshold(self) -> float:
        return self.meta.threshold

    @property
    def has_gate(self) -> bool:
        return self.gate is not None

    def report(self) -> dict | None:
        return read_json(self.directory, REPORT_FILE) if self.directory else None

    def history(self) -> list | dict | None:
        return read_json(self.directory, HISTORY_FILE) if self.directory else None

    # ---- preprocessing ----------------------------------------------------------------------
    def to_tensor(self, gray: np.ndarray) -> torch.Tensor:
        """Decoded grayscale image -> normalised model input (1 x S x S)."""
        return self.meta.normalize(resize_square(gray, self.meta.input_size))

    def _probs(self, logits: torch.Tensor, calibrated: bool = True) -> np.ndarray:
        if calibrated:
            return calibrated_probs(logits, self.meta.temperature, self.meta.bias, self.meta.positive_index)
        return calibrated_probs(logits, 1.0, 0.0, self.meta.positive_index)

    # ---- the one forward pass ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Normalised N x C x S x S -> (logits, tapped activations), under inference mode."""
        self._local.store = {}
        try:
            with torch.inference_mode():
                dtype = torch.bfloat16 if self.bf16 else torch.float32
                x = x.to(self.device, dtype, non_blocking=True).contiguous(memory_format=torch.channels_last)
                logits = self._net(x).float()
            return logits, self._local.store
        finally:
            self._local.store = None

    def logits(self, batch: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Preprocessed N x C x S x S tensor -> raw logits (N x classes, CPU, before temperature)."""
        out = [self.forward(batch[i : i + batch_size])[0].cpu() for i in range(0, len(batch), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.meta.num_classes)

    def features(self, batch: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and pooled activations of every tapped layer (what the gate is fitted on)."""
        logits, feats = [], {}
        for i in range(0, len(batch), batch_size):
            lg, taps = self.forward(batch[i : i + batch_size])
            logits.append(lg.cpu())
            for name, f in pooled(taps, taps).items():
                feats.setdefault(name, []).append(f.cpu())
        return torch.cat(logits), {k: torch.cat(v) for k, v in feats.items()}

    def predict_tensor(self, batch: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Preprocessed N x C x S x S tensor -> calibrated P(positive) per row."""
        return self._probs(self.logits(batch, batch_size))

    def predict_proba(self, images: ImageSource | Sequence[ImageSource], batch_size: int = 32) -> np.ndarray:
        """P(pneumonia) for one image or a sequence of images (bytes, paths, PIL, arrays)."""
        return np.array([p.probability for p in self.predict(images, batch_size)], dtype=np.float64)

    def predict(self, images: ImageSource | Sequence[ImageSource], batch_size: int = 32,
                heatmaps: bool = False) -> list[Prediction]:
        """Probability and input check per image, from one forward pass (the public batched form).

        Accepts what ``decode_image`` accepts and ``model.preprocessing.DecodedImage`` (whose DICOM
        tags and colour content the check uses). ``heatmaps=True`` adds the default heatmap for the
        positive class at the model's input size, from the same pass (architectures with a
        backward-free CAM only; otherwise ``None``: use :meth:`analyze`)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            decoded = [_decoded(img) for img in images[start : start + batch_size]]
            squares = [resize_square(g, self.meta.input_size) for g, _, _ in decoded]
            logits, taps = self.forward(torch.stack([self.meta.normalize(sq) for sq in squares]))
            probs = self._probs(logits)
            checks = self._checks(taps, squares, decoded)
            maps = [None] * len(squares)
            if heatmaps and self._fast_cam:
                fmap = taps[get_spec(self.meta.architecture).cam_layer]
                maps = list(self._class_activation_map(fmap, self.meta.positive_index, DEFAULT_CAM_METHOD))
            out.extend(Prediction(float(p), c, m) for p, c, m in zip(probs, checks, maps))
        return out

    def _checks(self, taps: dict, squares: list[np.ndarray], decoded: list) -> list[InputCheck]:
        scores = self.gate.scores(pooled(taps, self.gate.layers)) if self.gate else np.zeros(len(squares))
        checks = []
        for sq, (_, colour, dicom), score in zip(squares, decoded, scores):
            reason = rule_reason(sq, colour, dicom)
            if reason is None and self.gate is not None and score > self.gate.threshold:
                reason = "its content is unlike the frontal chest films the model was trained on."
            checks.append(InputCheck(flagged=reason is not None, score=round(float(score), 4),
                                     reason=f"This does not look like a frontal chest X-ray: {reason}" if reason else None))
        return checks

    def check_input(self, image: ImageSource) -> InputCheck:
        """Is this an image the model can read? (See model.gate.)"""
        return self.predict([image])[0].check

    def check_inputs(self, images: Sequence[ImageSource], batch_size: int = 32) -> list[InputCheck]:
        return [p.check for p in self.predict(list(images), batch_size)]

    # ---- explanation ------------------------------------------------------------------------
    def _cam(self, method: str, layer: str | None):
        import pytorch_grad_cam

        if method not in CAM_METHODS:
            raise ValueError(f"Unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}.")
        if self._cam_net is None:
            self._cam_net = copy.deepcopy(self._net).float().to(memory_format=torch.contiguous_format)  # gradients in fp32
            for p in self._cam_net.parameters():
                p.requires_grad_(True)
        key = (method, layer)
        if key not in self._cams:
            cls = getattr(pytorch_grad_cam, CAM_METHODS[method])
            target = self._cam_net.get_submodule(layer) if layer else cam_target_layer(self._cam_net, self.meta.architecture)
            self._cams[key] = cls(model=self._cam_net, target_layers=[target])
        return self._cams[key]

    def _target_index(self, target: str | int) -> int:
        if isinstance(target, int):
            return target
        names = [c.lower() for c in self.meta.class_names]
        if target.lower() not in names:
            raise ValueError(f"Unknown target {target!r}; classes are {self.meta.class_names}.")
        return names.index(target.lower())

    def _class_activation_map(self, fmap: torch.Tensor, idx: int, method: str = "gradcam") -> np.ndarray:
        """Grad-CAM / Grad-CAM++ (N x S x S) at the last block of a GAP + linear head, without a backward pass.

        The gradient of a class logit w.r.t. the final feature map is that class's fc weights / (h w)
        at every cell. Grad-CAM's channel weights are then the fc weights (Zhou et al. 2016's CAM);
        Grad-CAM++'s (Chattopadhay et al. 2018, eq. 19, with pytorch-grad-cam's eps) follow in closed
        form from the same constant gradient and each channel's activation sum. Normalised as
        pytorch-grad-cam does (ReLU, min-max, bilinear to the input size). Equality is tested."""
        fmap = fmap.float()
        h, w_ = fmap.shape[-2:]
        w = self._head.weight[idx].float()
        if method == "gradcam++":
            g = (w / (h * w_))[None]  # n=1 x c: the gradient, the same at every cell
            g2 = g * g
            a = g2 / (2 * g2 + fmap.sum(dim=(2, 3)) * g2 * g + 1e-6)
            weights = torch.where(g != 0, a, torch.zeros_like(a)) * torch.relu(g) * (h * w_)
        else:
            weights = w[None].expand(fmap.shape[0], -1)
        cam = torch.relu(torch.einsum("nc,nchw->nhw", weights, fmap))[:, None]
        size = self.meta.input_size
        cam = cam - cam.amin(dim=(2, 3), keepdim=True)
        cam = cam / (cam.amax(dim=(2, 3), keepdim=True) + 1e-7)
        cam = torch.nn.functional.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
        cam = cam - cam.amin(dim=(2, 3), keepdim=True)  # pytorch-grad-cam min-max scales again after resizing
        cam = cam / (cam.amax(dim=(2, 3), keepdim=True) + 1e-7)
        return cam[:, 0].cpu().numpy()

    def analyze(self, image: ImageSource, method: str = DEFAULT_CAM_METHOD, target: str | int = "pneumonia",
                layer: str | None = None) -> Analysis:
        """Decode once, then probability, input check and heatmap. Grad-CAM and Grad-CAM++ at the last
        block come from the same forward pass; other methods and layers use pytorch-grad-cam."""
        gray, colour, dicom = _decoded(image)
        idx = self._target_index(target)
        square = resize_square(gray, self.meta.input_size)
        x = self.meta.normalize(square).unsqueeze(0)
        spec = get_spec(self.meta.architecture)
        if method not in CAM_METHODS:
            raise ValueError(f"Unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}.")
        logits, taps = self.forward(x)
        prob = float(self._probs(logits)[0])
        check = self._checks(taps, [square], [(gray, colour, dicom)])[0]
        if method in FAST_CAM_METHODS and layer in (None, spec.cam_layer) and self._fast_cam:
            heat = self._class_activation_map(taps[spec.cam_layer], idx, method)[0]
        else:
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            with self._cam_lock:
                cam = self._cam(method, layer)
                maps = cam(input_tensor=x.to(self.device), targets=[ClassifierOutputTarget(idx)])
                cam.activations_and_grads.clear()
            heat = maps[0].astype(np.float32)
        heat = np.nan_to_num(heat, nan=0.0)
        h, w = gray.shape
        if heat.shape != (h, w):
            heat = np.asarray(Image.fromarray(heat, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)
        return Analysis(probability=prob, heatmap=np.clip(heat, 0.0, 1.0), image=gray, check=check)

    def explain(self, image: ImageSource, method: str = DEFAULT_CAM_METHOD, target: str | int = "pneumonia",
                layer: str | None = None) -> np.ndarray:
        """Heatmap (H x W, [0, 1], at the input image's size) of where the model looked."""
        return self.analyze(image, method, target, layer).heatmap


def load_model(path: str | Path | None = None, device: str | None = None, bf16: bool | None = None) -> Classifier:
    """Load a model artifact; default: ``$CXR_MODEL_DIR`` or the shipped ``assets/model``.

    ``bf16``: None = where the hardware runs it natively (measured on a bf16-native 2-core CPU, shipped
    model, 1034 validation films: max |dp| 0.0073 against fp32, 0 decisions changed, predict 1.4x faster);
    ``CXR_BF16=0`` forces fp32 (scores reproducible to 1e-6 across machines)."""
    directory = Path(path) if path is not None else default_model_dir()
    net, meta = load_artifact(directory)
    gate = Gate.load(directory, meta.gate) if meta.gate else None
    return Classifier(net, meta, directory=directory, device=device, gate=gate, bf16=bf16)


def jet(values: np.ndarray) -> np.ndarray:
    """Matplotlib-style jet colour map in numpy: [0, 1] -> uint8 RGB (the viewer's colour scale too)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([r, g, b], axis=-1) * 255).round().astype(np.uint8)


def overlay(image: ImageSource, heatmap: np.ndarray, opacity: float = 0.4) -> np.ndarray:
    """Blend a jet-coloured heatmap over the image; returns H x W x 3 uint8 RGB at the image's size.

    numpy only: pytorch-grad-cam's ``show_cam_on_image`` would import the library (with OpenCV and
    matplotlib, ~8 s here) on the first heatmap a server is asked for."""
    gray = as_gray(image)
    h, w = gray.shape
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != (h, w):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)
    a = float(np.clip(opacity, 0.0, 1.0))
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    return np.clip((1 - a) * rgb + a * jet(heat).astype(np.float32), 0, 255).round().astype(np.uint8)
