"""benchmarks.faithfulness on a tiny random model and 2 synthetic films: schema and finite numbers."""

import math

import model
import numpy as np
import torch

from benchmarks.faithfulness import METHODS, fast_imputer, faithfulness, layer_sets, to_markdown
from tests.conftest import gradient_image, make_artifact


def test_layer_sets_for_resnet():
    labels = [label for label, _, _ in layer_sets("resnet18")]
    assert labels == ["layer4", "layer3", "layer3+layer4"]


def test_faithfulness_schema(tmp_path):
    clf = model.load_model(make_artifact(tmp_path, size=64))
    images = [gradient_image(80, 70), gradient_image(70, 80)[::-1].copy()]
    rows = faithfulness(clf, images, percentiles=(50,), batch_size=2)
    assert {(r["method"], r["layer"]) for r in rows} >= {(m, "layer4") for m in METHODS} | {("layercam", "layer3+layer4")}
    for r in rows:
        assert set(r) == {"method", "layer", "road_combined_mean", "road_combined_sd", "n", "seconds_per_image",
                          "morf_mean", "lerf_mean"}
        assert r["n"] == 2
        assert all(math.isfinite(r[k]) for k in r if k not in ("method", "layer"))
    assert "| method | layer |" in to_markdown({"rows": rows})


def test_fast_imputer_equals_library():
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.standard_normal((1, 20, 17)).astype(np.float32))
    mask = torch.from_numpy((rng.random((20, 17)) > 0.4).astype(np.float32))
    ref = NoisyLinearImputer(noise=0.0)(img, mask)
    fast = fast_imputer(noise=0.0)(img, mask)
    assert torch.equal(fast[:, mask > 0.5], img[:, mask > 0.5])
    assert (fast - ref).abs().max().item() < 1e-5
