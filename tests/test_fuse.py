"""BatchNorm folding for serving: same probabilities, gate scores and heatmaps; never a wrong network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import model
from model.artifact import load_artifact
from model.classifier import Classifier
from model.fuse import fold_batchnorm
from model.gate import Gate


@pytest.fixture(scope="module")
def shipped_pair():
    directory = model.default_model_dir()
    net, meta = load_artifact(directory)
    gate = Gate.load(directory, meta.gate) if meta.gate else None
    return tuple(Classifier(net, meta, directory, gate=gate, fold_bn=f, bf16=False) for f in (True, False))


def test_shipped_model_folded_gives_the_same_answers(shipped_pair, real_images):
    folded, plain = shipped_pair
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded._net.modules()) == 0  # all 20 pairs of ResNet-18
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain._net.modules()) == 20
    films = [p.read_bytes() for c in real_images.values() for p in c]
    np.testing.assert_allclose(folded.predict_proba(films), plain.predict_proba(films), atol=1e-5)
    for a, b in zip(folded.check_inputs(films), plain.check_inputs(films)):
        assert a.flagged == b.flagged and a.score == pytest.approx(b.score, abs=2e-4)  # scores are rounded to 4 decimals
    for film in films[:2]:
        np.testing.assert_allclose(folded.analyze(film).heatmap, plain.analyze(film).heatmap, atol=1e-4)


class _BnFirst(nn.Module):
    """Named like a ResNet stem, but the BatchNorm runs *before* the convolution: must not be folded."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, out_channels, 3, bias=False), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv1(self.bn1(x))


@pytest.mark.parametrize("out_channels", [3, 4])  # 3: folds but computes something else; 4: cannot fold
def test_a_network_the_naming_rule_misreads_is_served_unfolded(out_channels):
    torch.manual_seed(0)
    net = _BnFirst(out_channels)
    net.bn1.running_mean.uniform_(-1, 1)
    net.bn1.running_var.uniform_(0.5, 2)
    net.eval()
    probe = torch.randn(2, 3, 16, 16)
    served, n = fold_batchnorm(net, probe)
    assert n == 0 and served is net


def test_sequential_pairs_fold_and_training_mode_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(net, torch.randn(1, 1, 12, 12))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    net.eval()
    probe = torch.randn(2, 1, 12, 12)
    served, n = fold_batchnorm(net, probe)
    assert n == 2 and served is not net
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(served(x), net(x), atol=1e-5, rtol=1e-5)
