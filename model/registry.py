"""Architectures by name, in the spirit of timm's registry: adding one is one ``register`` call.

Every entry wraps a torchvision constructor with ``weights=None`` (no download at run time), swaps
the first convolution for one with ``in_chans`` inputs (X-rays are grayscale), and names the layer
whose activations Grad-CAM should use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights were requested but could not be obtained (typically: no internet)."""


@dataclass(frozen=True)
class ArchSpec:
    name: str
    builder: Callable[..., nn.Module]
    weights_enum: object  # torchvision WeightsEnum class, used only for --pretrained
    stem: str  # dotted path of the first convolution
    cam_layer: str  # dotted path of the Grad-CAM target layer
    classifier: str  # dotted path of the final Linear layer


_REGISTRY: dict[str, ArchSpec] = {}


def register(name, builder, weights_enum, stem, cam_layer, classifier) -> None:
    _REGISTRY[name] = ArchSpec(name, builder, weights_enum, stem, cam_layer, classifier)


register("resnet18", tvm.resnet18, tvm.ResNet18_Weights, "conv1", "layer4", "fc")
register("resnet50", tvm.resnet50, tvm.ResNet50_Weights, "conv1", "layer4", "fc")
register("densenet121", tvm.densenet121, tvm.DenseNet121_Weights, "features.conv0", "features.norm5", "classifier")
register("efficientnet_b0", tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights, "features.0.0", "features.8", "classifier.1")
register(
    "mobilenet_v3_large", tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights,
    "features.0.0", "features.16", "classifier.3",
)


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
    try:
        return spec.builder(weights=spec.weights_enum.DEFAULT)
    except Exception as err:  # URLError, HTTPError, socket errors, hash mismatch...
        raise PretrainedWeightsUnavailable(
            f"Could not obtain ImageNet weights for {spec.name} ({type(err).__name__}: {err}). "
            "They are downloaded from download.pytorch.org on first use; this machine may be offline. "
            "Train from scratch (omit --pretrained) or pre-populate the torch hub cache."
        ) from None


def create_model(name: str = "resnet18", num_classes: int = 2, in_chans: int = 1, pretrained: bool = False) -> nn.Module:
    """Build an architecture by name, adapted to ``in_chans`` inputs and ``num_classes`` outputs."""
    spec = get_spec(name)
    if pretrained:
        net = _load_pretrained(spec)
        head = net.get_submodule(spec.classifier)
        _set_submodule(net, spec.classifier, nn.Linear(head.in_features, num_classes))
    else:
        net = spec.builder(weights=None, num_classes=num_classes)
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


def cam_target_layer(net: nn.Module, name: str) -> nn.Module:
    return net.get_submodule(get_spec(name).cam_layer)
