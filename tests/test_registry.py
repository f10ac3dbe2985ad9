"""Every registered architecture builds from scratch for grayscale input, runs, and yields a CAM."""

import numpy as np
import pytest
import torch

import model
from tests.conftest import gradient_image, make_artifact

REQUIRED = {"resnet18", "resnet50", "densenet121", "efficientnet_b0", "mobilenet_v3_large"}


def test_registry_lists_required_architectures():
    assert REQUIRED <= set(model.list_models())


@pytest.mark.parametrize("arch", model.list_models())
def test_forward_and_cam(arch, tmp_path):
    net = model.create_model(arch, num_classes=2, in_chans=1)
    assert model.cam_target_layer(net, arch) is not None
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 2)
    clf = model.load_model(make_artifact(tmp_path, arch, size=64))
    heat = clf.explain(gradient_image(100, 80))
    assert heat.shape == (100, 80) and 0.0 <= heat.min() and heat.max() <= 1.0
    assert np.isfinite(heat).all()


def test_in_chans_and_num_classes():
    net = model.create_model("resnet18", num_classes=3, in_chans=3)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_unknown_architecture_is_clear():
    with pytest.raises(ValueError, match="Unknown architecture 'vgg99'.*resnet18"):
        model.create_model("vgg99")


@pytest.mark.parametrize("arch", ["resnet18", "resnet18_aa"])
def test_pretrained_offline_fails_clearly(monkeypatch, arch):
    import torchvision

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.DEFAULT, "get_state_dict", offline)
    with pytest.raises(model.PretrainedWeightsUnavailable, match="offline|omit --pretrained"):
        model.create_model(arch, pretrained=True)
