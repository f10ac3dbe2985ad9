"""The input gate: is this an image the model can read (a frontal chest film like its training films)?

Contract relied on outside the project: ``Classifier.check_input(image) -> InputCheck`` with
``.flagged`` (bool), ``.score`` (float, higher = less like the training films) and ``.reason``
(a sentence for the user, or None).

Two layers, both cheap:

1. Rules on what the file says and on trivial image statistics: a DICOM whose Modality is not a
   radiograph, a body part that is not the chest, a lateral view; an image with real colour; a
   near-blank image.
2. A feature-space distance (Lee et al. 2018, "A simple unified framework for detecting
   out-of-distribution samples"): the Mahalanobis distance of the network's own pooled activations
   at a few depths to the class means of the *training* films, with one shared, shrunk covariance
   per depth (Ledoit-Wolf). Distances are put on one scale (z-scores against the validation films)
   and the largest is the score. The features come from the same forward pass as the probability.
   Its statistics are fitted when a model is trained and travel in the artifact (``gate.safetensors``,
   checksum in ``model.json``), so a retrained model carries its own gate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

GATE_FILE = "gate.safetensors"

# DICOM Modality values of projection radiographs; anything else named (CT, MR, US, ...) is refused.
# Empty, OT (other) and SC (secondary capture) say nothing: the image decides.
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG"}
UNINFORMATIVE_MODALITIES = {"", "OT", "SC"}
MODALITY_NAMES = {
    "CT": "computed tomography", "MR": "MRI", "US": "ultrasound", "MG": "mammography", "NM": "nuclear medicine",
    "PT": "PET", "XA": "angiography", "RF": "fluoroscopy", "IO": "an intra-oral (dental) X-ray",
    "PX": "a panoramic dental X-ray", "ES": "endoscopy", "OP": "ophthalmic photography", "XC": "a photograph",
    "SM": "microscopy", "OCT": "optical coherence tomography", "ECG": "an ECG",
}
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_ABDOMEN", "CHESTABDOMEN", "TORSO", "WHOLEBODY", "BODY"}
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLO", "RLO"}

COLORFULNESS_LIMIT = 12.0  # Hasler-Suesstrunk M: ~0 for grey films, < 8 "not colourful", > 15 visibly colour
BLANK_STD = 3.0  # grey levels: an image whose square input varies less than this shows nothing


@dataclass(frozen=True)
class InputCheck:
    flagged: bool
    score: float  # higher = less like the training films; the gate's threshold separates flagged from not
    reason: str | None = None  # a sentence for the user when flagged, else None

    def to_dict(self) -> dict:
        return asdict(self)


UNCHECKED = InputCheck(flagged=False, score=0.0, reason=None)


# ------------------------------------------------------------------------------------------------
# rules
# ------------------------------------------------------------------------------------------------


def rule_reason(square: np.ndarray, colorfulness: float = 0.0, dicom: dict | None = None) -> str | None:
    """A sentence when the file or trivial statistics already say the model cannot read it."""
    dicom = dicom or {}
    modality = str(dicom.get("Modality", "")).strip().upper()
    if modality and modality not in RADIOGRAPH_MODALITIES | UNINFORMATIVE_MODALITIES:
        what = MODALITY_NAMES.get(modality, f"modality {modality}")
        return f"the DICOM file says it is {what} ({modality}), not a radiograph (CR/DX)."
    body = str(dicom.get("BodyPartExamined", "")).strip().upper().replace(" ", "_")
    if body and body not in CHEST_BODY_PARTS:
        return f"the DICOM file says the body part is {body.lower()}, not the chest."
    view = str(dicom.get("ViewPosition", "")).strip().upper()
    if view in LATERAL_VIEWS:
        return f"the DICOM file says it is a lateral view ({view}); the model reads frontal (AP/PA) films."
    if colorfulness > COLORFULNESS_LIMIT:
        return "it is a colour image; X-rays are grayscale."
    if float(np.asarray(square, dtype=np.float32).std()) < BLANK_STD:
        return "it is almost uniform (blank)."
    return None


# ------------------------------------------------------------------------------------------------
# feature-space distance
# ------------------------------------------------------------------------------------------------


def gate_layers(architecture: str) -> list[str]:
    """Depths the gate measures: the last two stages of a ResNet (texture and layout; Lee et al.
    combine several depths), the CAM layer elsewhere."""
    from .registry import get_spec

    last = get_spec(architecture).cam_layer
    return ["layer3", last] if architecture.startswith("resnet") else [last]


def pooled(taps: dict[str, torch.Tensor], layers) -> dict[str, torch.Tensor]:
    """Global-average-pooled activations (N x C, float32) per tapped layer."""
    return {name: taps[name].float().mean(dim=(2, 3)) for name in layers}


@dataclass
class Gate:
    layers: list[str]
    means: dict[str, torch.Tensor]  # layer -> classes x C (training films' class means)
    precisions: dict[str, torch.Tensor]  # layer -> C x C (inverse of the shared, shrunk covariance)
    z_mu: dict[str, float]  # layer -> mean distance on the validation films
    z_sd: dict[str, float]  # layer -> sd of it
    threshold: float  # score above this is flagged
    info: dict = field(default_factory=dict)  # figures for the model card (method, val flag rate, ...)

    def scores(self, feats: dict[str, torch.Tensor]) -> np.ndarray:
        """Per image: the largest z-scored Mahalanobis distance over the tapped layers."""
        per_layer = []
        for name in self.layers:
            f = feats[name].float()
            d = f[:, None, :] - self.means[name][None]  # N x classes x C
            m = torch.einsum("nkc,cd,nkd->nk", d, self.precisions[name], d).clamp_(min=0).sqrt().min(dim=1).values
            per_layer.append((m - self.z_mu[name]) / self.z_sd[name])
        return torch.stack(per_layer, 1).max(dim=1).values.numpy().astype(np.float64)

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> dict:
        """Write ``gate.safetensors``; returns the metadata block for model.json (with its checksum)."""
        from .artifact import save_tensors, sha256_file

        tensors = {}
        for name in self.layers:
            tensors[f"{name}.means"] = self.means[name].contiguous()
            tensors[f"{name}.precision"] = self.precisions[name].contiguous()
            tensors[f"{name}.z"] = torch.tensor([self.z_mu[name], self.z_sd[name]], dtype=torch.float32)
        path = Path(directory) / GATE_FILE
        save_tensors(tensors, path)
        return {**self.info, "file": GATE_FILE, "layers": self.layers, "threshold": self.threshold,
                "sha256": sha256_file(path)}

    @classmethod
    def load(cls, directory: str | Path, block: dict) -> "Gate":
        from safetensors.torch import load_file

        from .artifact import ModelArtifactError, sha256_file

        path = Path(directory) / block.get("file", GATE_FILE)
        if not path.is_file():
            raise ModelArtifactError(f"model.json names an input gate but {path.name} is missing.")
        if sha256_file(path) != block.get("sha256"):
            raise ModelArtifactError(f"{path.name} does not match the checksum in model.json; refusing to load it.")
        t = load_file(str(path))
        layers = list(block["layers"])
        try:
            return cls(layers=layers, means={n: t[f"{n}.means"] for n in layers},
                       precisions={n: t[f"{n}.precision"] for n in layers},
                       z_mu={n: float(t[f"{n}.z"][0]) for n in layers}, z_sd={n: float(t[f"{n}.z"][1]) for n in layers},
                       threshold=float(block["threshold"]),
                       info={k: v for k, v in block.items() if k not in ("file", "layers", "threshold", "sha256")})
        except KeyError as err:
            raise ModelArtifactError(f"{path.name} lacks {err}.") from None


def fit_gate(train_feats: dict[str, torch.Tensor], train_labels: torch.Tensor, val_feats: dict[str, torch.Tensor],
             max_val_flag_rate: float = 0.005) -> Gate:
    """Class means and a shared Ledoit-Wolf covariance from the training films; z-scaling and the
    threshold from the validation films (the threshold flags ``max_val_flag_rate`` of them)."""
    from sklearn.covariance import LedoitWolf

    layers = list(train_feats)
    y = train_labels.numpy()
    classes = sorted(set(y.tolist()))
    means, precisions, z_mu, z_sd = {}, {}, {}, {}
    for name in layers:
        x = train_feats[name].double().numpy()
        mu = np.stack([x[y == c].mean(0) for c in classes])
        centred = x - mu[np.searchsorted(classes, y)]
        lw = LedoitWolf(assume_centered=True).fit(centred)
        means[name] = torch.from_numpy(mu).float()
        precisions[name] = torch.from_numpy(lw.precision_).float()
    gate = Gate(layers, means, precisions, {n: 0.0 for n in layers}, {n: 1.0 for n in layers}, threshold=0.0)
    for name in layers:  # z-scale each depth by the validation films' own distances
        raw = Gate([name], means, precisions, {name: 0.0}, {name: 1.0}, 0.0).scores(val_feats)
        z_mu[name], z_sd[name] = float(raw.mean()), float(raw.std() + 1e-6)
    gate.z_mu, gate.z_sd = z_mu, z_sd
    val_scores = gate.scores(val_feats)
    gate.threshold = float(np.quantile(val_scores, 1.0 - max_val_flag_rate))
    gate.info = {"method": "mahalanobis (Lee et al. 2018): class means + shared Ledoit-Wolf covariance per layer, "
                           "max z-score over layers",
                 "fitted_on": {"train_images": int(len(y)), "val_images": int(len(val_scores))},
                 "val_flag_rate": float((val_scores > gate.threshold).mean())}
    return gate
