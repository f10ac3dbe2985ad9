"""model.resnet is torchvision's ResNet without torchvision: same state-dict keys, same logits."""

from pathlib import Path

import pytest
import torch

import model
from model import resnet

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "model"


def _grayscale(net: torch.nn.Module) -> torch.nn.Module:
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # as the registry adapts the stem
    return net


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_same_keys_and_logits_as_torchvision(arch):
    from torchvision import models

    torch.manual_seed(0)
    ref = _grayscale(getattr(models, arch)(weights=None, num_classes=2)).eval()
    ours = _grayscale(getattr(resnet, arch)(num_classes=2)).eval()
    state = ref.state_dict()
    assert list(ours.state_dict()) == list(state)  # same names, same order
    for k, v in state.items():
        if v.is_floating_point():  # non-trivial running stats, so eval-mode BN is really compared
            state[k] = v + 0.1 * torch.rand_like(v) if "running_var" in k else v + 0.01 * torch.randn_like(v)
    ref.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, 1, 96, 80)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert diff <= 1e-5


def test_registry_builds_own_resnet():
    net = model.create_model("resnet18")
    assert type(net) is resnet.ResNet and net.conv1.in_channels == 1 and net.fc.out_features == 2
    assert model.cam_target_layer(net, "resnet18") is net.layer4
    assert model.cam_target_layer(net, "resnet18", fine=True) is net.layer3


def test_shipped_artifact_matches_torchvision():
    """The shipped weights (trained as torchvision's resnet18) load strictly and give the same logits."""
    from safetensors.torch import load_file
    from torchvision import models

    ours, meta = model.load_artifact(SHIPPED)
    assert type(ours) is resnet.ResNet and meta.architecture == "resnet18"
    ref = _grayscale(models.resnet18(weights=None, num_classes=2))
    ref.load_state_dict(load_file(str(SHIPPED / "weights.safetensors")), strict=True)
    torch.manual_seed(1)
    x = torch.randn(4, 1, meta.input_size, meta.input_size)
    with torch.no_grad():
        diff = (ours.eval()(x) - ref.eval()(x)).abs().max().item()
    assert diff <= 1e-5


def test_antialiased_resnet18_takes_plain_weights_and_blurs_before_each_stride():
    plain, aa = resnet.resnet18(num_classes=2).eval(), resnet.resnet18_aa(num_classes=2).eval()
    assert list(aa.state_dict()) == list(plain.state_dict())  # no new parameters or saved buffers
    aa.load_state_dict(plain.state_dict(), strict=True)
    blurred = [name for name, m in aa.named_modules() if isinstance(m, resnet.Blur)]
    assert blurred == ["layer2.0.blur", "layer3.0.blur", "layer4.0.blur"]  # the three stride-2 blocks
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert not torch.allclose(aa(x), plain(x), atol=1e-4)
    with pytest.raises(ValueError, match="BasicBlock"):
        resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], antialias=True)


def test_blur_keeps_the_mean_and_removes_what_a_stride_of_2_would_alias():
    """A Nyquist-frequency checkerboard, sampled every second pixel, reads as a flat image of +-1 (aliased to
    DC); the low-pass removes it entirely first, and leaves a constant image as it was."""
    blur = resnet.Blur(2)
    i = torch.arange(16)
    checker = ((-1.0) ** (i[:, None] + i[None, :])).expand(1, 2, 16, 16)
    assert checker[..., ::2, ::2].abs().min() == 1  # what the stride alone would pass on
    assert blur(checker).abs().max() < 1e-6
    flat = torch.full((1, 2, 16, 16), 0.3)
    torch.testing.assert_close(blur(flat), flat)
