"""Architectures by name, in the spirit of timm's registry: adding one is one ``register`` call.

Every entry builds a network from scratch (no download at run time); ``create_model`` swaps the first
convolution for one with ``in_chans`` inputs (X-rays are grayscale) and the spec names the layers
whose activations the heatmaps use. ResNets come from ``model.resnet`` (plain torch, torchvision's
state-dict keys), so serving them never imports torchvision, which costs ~4 s; the other
architectures import torchvision when first built. The name is torchvision's constructor name, used
with ``weights`` (the name of torchvision's weights enum) only for ``--pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .resnet import resnet18, resnet18_aa, resnet50


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights were requested but could not be obtained (typically: no internet)."""


@dataclass(frozen=True)
class ArchSpec:
    name: str  # also torchvision's constructor name (for --pretrained)
    builder: Callable[..., nn.Module]  # builder(num_classes=...) -> network with 3 input channels
    weights: str  # name of the torchvision WeightsEnum class, used only for --pretrained
    stem: str  # dotted path of the first convolution
    cam_layer: str  # dotted path of the Grad-CAM target layer (last block: 6 x 6 at 192 px)
    classifier: str  # dotted path of the final Linear layer
    fine_cam_layer: str = ""  # the block before it (12 x 12 at 192 px), for finer heatmaps
    pretrained_as: str = ""  # torchvision constructor whose ImageNet weights fit, when not ``name`` itself


_REGISTRY: dict[str, ArchSpec] = {}


def register(name, builder, weights, stem, cam_layer, classifier, fine_cam_layer="", pretrained_as="") -> None:
    _REGISTRY[name] = ArchSpec(name, builder, weights, stem, cam_layer, classifier, fine_cam_layer, pretrained_as)


def torchvision_builder(name: str) -> Callable[..., nn.Module]:
    """``torchvision.models.<name>(weights=None, ...)``, importing torchvision only when called."""

    def build(**kwargs) -> nn.Module:
        from torchvision import models

        return getattr(models, name)(weights=None, **kwargs)

    build.__name__ = build.__qualname__ = name
    return build


register("resnet18", resnet18, "ResNet18_Weights", "conv1", "layer4", "fc", "layer3")
register("resnet18_aa", resnet18_aa, "ResNet18_Weights", "conv1", "layer4", "fc", "layer3", pretrained_as="resnet18")
register("resnet50", resnet50, "ResNet50_Weights", "conv1", "layer4", "fc", "layer3")
register("densenet121", torchvision_builder("densenet121"), "DenseNet121_Weights", "features.conv0",
         "features.norm5", "classifier", "features.denseblock3")
register("efficientnet_b0", torchvision_builder("efficientnet_b0"), "EfficientNet_B0_Weights", "features.0.0",
         "features.8", "classifier.1", "features.5")
register("mobilenet_v3_large", torchvision_builder("mobilenet_v3_large"), "MobileNet_V3_Large_Weights",
         "features.0.0", "features.16", "classifier.3", "features.12")


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ArchSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown architecture {name!r}; available: {', '.join(list_models())}") from None


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def _load_pretrained(spec: ArchSpec) -> nn.Module:
    """ImageNet weights through torchvision (imported here only), copied into ``spec.builder``'s network."""
    try:
        from torchvision import models
    except ImportError as err:
        raise PretrainedWeightsUnavailable(
            f"--pretrained needs torchvision, which could not be imported ({err}). "
            "Install torchvision or train from scratch (omit --pretrained)."
        ) from None
    try:
        weights = getattr(models, spec.weights).DEFAULT
        reference = getattr(models, spec.pretrained_as or spec.name)(weights=weights)  # downloads, checks the hash, remaps old keys
    except Exception as err:  # URLError, HTTPError, socket errors, hash mismatch...
        raise PretrainedWeightsUnavailable(
            f"Could not obtain ImageNet weights for {spec.name} ({type(err).__name__}: {err}). "
            "They are downloaded from download.pytorch.org on first use; this machine may be offline. "
            "Train from scratch (omit --pretrained) or pre-populate the torch hub cache."
        ) from None
    net = spec.builder(num_classes=len(weights.meta["categories"]))
    net.load_state_dict(reference.state_dict(), strict=True)
    return net


def create_model(name: str = "resnet18", num_classes: int = 2, in_chans: int = 1, pretrained: bool = False) -> nn.Module:
    """Build an architecture by name, adapted to ``in_chans`` inputs and ``num_classes`` outputs."""
    spec = get_spec(name)
    if pretrained:
        net = _load_pretrained(spec)
        head = net.get_submodule(spec.classifier)
        _set_submodule(net, spec.classifier, nn.Linear(head.in_features, num_classes))
    else:
        net = spec.builder(num_classes=num_classes)
    stem = net.get_submodule(spec.stem)
    if stem.in_channels != in_chans:
        new = nn.Conv2d(
            in_chans, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
            stem.dilation, stem.groups, stem.bias is not None, stem.padding_mode,
        )
        if pretrained:  # keep the learnt filters, as timm's adapt_input_conv does: the RGB sum
            with torch.no_grad():  # gives the same response to a grey image replicated to RGB
                w = stem.weight.sum(dim=1, keepdim=True)
                new.weight.copy_(w.repeat(1, in_chans, 1, 1) / in_chans)
        _set_submodule(net, spec.stem, new)
    return net


def cam_layer_path(name: str, fine: bool = False) -> str:
    """Dotted path of the heatmap layer: the last block, or (``fine``) the block before it."""
    spec = get_spec(name)
    return (spec.fine_cam_layer or spec.cam_layer) if fine else spec.cam_layer


def cam_target_layer(net: nn.Module, name: str, fine: bool = False) -> nn.Module:
    return net.get_submodule(cam_layer_path(name, fine))
