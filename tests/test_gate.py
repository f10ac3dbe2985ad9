"""The input gate (model.gate) and the fused forward pass: contract, rules, fitted statistics, the
shipped model's gate on real and synthetic inputs, and the backward-free Grad-CAM."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import model
from model.artifact import ModelArtifactError
from model.gate import GATE_FILE, InputCheck, fit_gate, rule_reason
from model.preprocessing import colorfulness

from .conftest import make_artifact


@pytest.fixture(scope="module")
def shipped():
    clf = model.load_model(bf16=False)  # compared with fp32 references; bf16 serving: test_shipped_model
    assert clf.has_gate, "the shipped model must carry a fitted input gate"
    return clf


@pytest.fixture(scope="module")
def films(data_dir):
    return [model.decode_image(p) for c in ("NORMAL", "PNEUMONIA") for p in sorted((data_dir / "val" / c).iterdir())]


# ---- contract ------------------------------------------------------------------------------------


def test_check_input_contract(shipped, films):
    check = shipped.check_input(films[0])
    assert isinstance(check, InputCheck)
    assert isinstance(check.flagged, bool) and isinstance(check.score, float)
    assert check.reason is None or isinstance(check.reason, str)
    assert set(check.to_dict()) == {"flagged", "score", "reason"}
    batch = shipped.check_inputs(films[:4])
    assert [c.score for c in batch] == pytest.approx([shipped.check_input(f).score for f in films[:4]], abs=1e-3)
    # analyze and predict carry the same check as check_input, from their own forward pass
    assert shipped.analyze(films[1]).check.score == pytest.approx(shipped.check_input(films[1]).score, abs=1e-3)
    pred = shipped.predict([films[2]])[0]
    assert pred.probability == pytest.approx(float(shipped.predict_proba(films[2])[0]))


def test_real_films_pass_and_non_films_are_flagged(shipped, films):
    assert not any(c.flagged for c in shipped.check_inputs(films)), "official val films must pass the gate"
    rng = np.random.default_rng(0)
    photo = np.zeros((300, 400, 3), np.uint8)
    photo[..., 0] = np.linspace(0, 255, 400)
    photo[..., 1] = rng.integers(0, 255, (300, 400))
    photo[100:200, 100:300, 2] = 220
    cases = {
        "white square": np.full((256, 256), 255, np.uint8),
        "noise": rng.integers(0, 256, (256, 256), dtype=np.uint8),
        "colour photo": photo,
        "inverted film": 255 - films[0],
        "rotated film": np.ascontiguousarray(np.rot90(films[3])),
    }
    for name, img in cases.items():
        check = shipped.check_input(img)
        assert check.flagged, name
        assert check.reason and check.reason.startswith("This does not look like a frontal chest X-ray"), name


def test_flagged_score_is_higher_than_films(shipped, films):
    film_scores = [c.score for c in shipped.check_inputs(films)]
    noise = np.random.default_rng(1).integers(0, 256, (256, 256), dtype=np.uint8)
    assert shipped.check_input(noise).score > max(film_scores)


# ---- rules ---------------------------------------------------------------------------------------


def test_rules_from_dicom_tags_and_pixels():
    sq = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    assert rule_reason(sq) is None
    assert "computed tomography" in rule_reason(sq, dicom={"Modality": "CT"})
    assert "MRI" in rule_reason(sq, dicom={"Modality": "MR"})
    assert rule_reason(sq, dicom={"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}) is None
    assert rule_reason(sq, dicom={"Modality": "OT"}) is None  # says nothing: the image decides
    assert "hand" in rule_reason(sq, dicom={"Modality": "DX", "BodyPartExamined": "HAND"})
    assert "lateral" in rule_reason(sq, dicom={"Modality": "DX", "ViewPosition": "LL"})
    assert "colour" in rule_reason(sq, colorfulness=40.0)
    assert "blank" in rule_reason(np.full((64, 64), 200, np.uint8))


def test_colorfulness_of_grey_and_colour():
    grey = np.repeat(np.random.default_rng(0).integers(0, 255, (50, 50, 1)), 3, axis=2)
    assert colorfulness(grey) == pytest.approx(0.0, abs=1e-6)
    red = np.zeros((50, 50, 3)); red[..., 0] = 200
    assert colorfulness(red) > 50


# ---- fitting and persistence ---------------------------------------------------------------------


def test_fit_gate_separates_shifted_features_and_respects_flag_rate():
    g = torch.Generator().manual_seed(0)
    train = {"a": torch.randn(600, 16, generator=g), "b": torch.randn(600, 8, generator=g)}
    labels = torch.tensor([0, 1] * 300)
    val = {"a": torch.randn(400, 16, generator=g), "b": torch.randn(400, 8, generator=g)}
    gate = fit_gate(train, labels, val, max_val_flag_rate=0.01)
    assert gate.info["val_flag_rate"] <= 0.01
    far = {"a": torch.randn(50, 16, generator=g) + 4, "b": torch.randn(50, 8, generator=g)}
    assert (gate.scores(far) > gate.threshold).mean() > 0.95


def test_gate_travels_with_the_artifact_and_is_verified(tmp_path, data_dir):
    from training.fit_gate import fit_and_store

    d = make_artifact(tmp_path / "m", size=64)
    clf = model.load_model(d)
    imgs = torch.from_numpy(np.stack([model.load_square(p, 64) for p in sorted((data_dir / "train" / "NORMAL").iterdir())[:40]
                                      + sorted((data_dir / "train" / "PNEUMONIA").iterdir())[:40]]))[:, None]
    labels = torch.tensor([0] * 40 + [1] * 40)
    block = fit_and_store(d, imgs, labels, imgs[::2])
    assert (d / GATE_FILE).is_file() and json.loads((d / "model.json").read_text())["gate"]["sha256"] == block["sha256"]
    loaded = model.load_model(d)
    assert loaded.has_gate and loaded.gate.threshold == pytest.approx(block["threshold"])
    assert not clf.has_gate
    (d / GATE_FILE).write_bytes((d / GATE_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelArtifactError, match="checksum"):
        model.load_model(d)


# ---- the fused forward pass ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_fast_cam_equals_pytorch_grad_cam(shipped, films, method):
    """Grad-CAM and Grad-CAM++ at the last block from the forward pass == pytorch-grad-cam's (with backward)."""
    for f in films[::4]:
        fast = shipped.analyze(f, method=method).heatmap
        slow = shipped.analyze(f, method=method, layer="layer3").heatmap  # a different layer differs...
        ref = _reference_gradcam(shipped, f, method)
        np.testing.assert_allclose(fast, ref, atol=1e-4)
        assert np.abs(fast - slow).max() > 1e-3  # ...so the layer argument really selects the layer
    pp, plain = shipped.analyze(films[0], method="gradcam++").heatmap, shipped.analyze(films[0], method="gradcam").heatmap
    assert np.abs(pp - plain).max() > 1e-3  # and the two methods are not the same map


def test_batched_predict_brings_the_default_heatmap_from_the_same_pass(shipped, films):
    """predict(heatmaps=True) on a batch == analyze() of each scored input, one film at a time; the
    Diagnose page uses it instead of a second forward pass (model.results.score_uploads)."""
    from model.results import score_uploads

    preds = shipped.predict(films, heatmaps=True)
    assert all(p.heatmap is None for p in shipped.predict(films[:2]))  # only when asked for
    for film, p in zip(films, preds):
        square = model.resize_square(film, shipped.meta.input_size)
        a = shipped.analyze(square)
        assert p.heatmap.shape == square.shape and p.probability == pytest.approx(a.probability, abs=1e-5)
        np.testing.assert_allclose(p.heatmap, a.heatmap, atol=1e-5)
    r = score_uploads(shipped, [("a.png", _png(films[0]))])[0]
    np.testing.assert_allclose(r.heatmap.astype(np.float32), shipped.analyze(r.square).heatmap, atol=1e-3)  # float16


def _png(gray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    return buf.getvalue()


def _reference_gradcam(clf, gray, method: str = "gradcam"):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import copy

    net = copy.deepcopy(clf._net).to(memory_format=torch.contiguous_format).float()
    for p in net.parameters():
        p.requires_grad_(True)
    x = clf.to_tensor(gray).unsqueeze(0)
    with {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}[method](model=net, target_layers=[net.layer4]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)])[0]
    h, w = gray.shape
    return np.clip(np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)), 0, 1)


def test_concurrent_checks_equal_serial(shipped, films):
    serial = [shipped.predict([f])[0] for f in films[:6]]
    results: dict[int, list] = {}

    def worker(k):
        results[k] = [shipped.predict([f])[0] for f in films[:6]]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(6):
        assert [p.check.score for p in results[k]] == [p.check.score for p in serial]
        assert [p.probability for p in results[k]] == pytest.approx([p.probability for p in serial], abs=1e-6)


def test_dicom_modality_refused_end_to_end(shipped):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    data = open(path, "rb").read()
    try:
        pred = shipped.predict([model.decode(io.BytesIO(data))])[0]
    except model.InvalidImageError:
        pytest.skip("this pydicom cannot decode CT_small.dcm")
    assert pred.check.flagged
    assert pydicom is not None
