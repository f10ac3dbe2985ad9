"""Artifact round trip; tampered, incomplete or mismatched artifacts are refused with a clear error."""

import json
import shutil
import stat

import pytest
import torch

import model
from model.artifact import META_FILE, WEIGHTS_FILE
from tests.conftest import make_artifact


def test_round_trip_preserves_weights_and_meta(tmp_path):
    torch.manual_seed(1)
    net = model.create_model("mobilenet_v3_large")
    meta = model.ModelMeta(architecture="mobilenet_v3_large", input_size=96, mean=0.4, std=0.3, temperature=1.7,
                           threshold=0.61, operating_points={"youden": 0.61}, metrics={"auc": 0.9})
    model.save_artifact(tmp_path, net, meta)
    loaded, meta2 = model.load_artifact(tmp_path)
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert meta2 == meta and len(meta2.weights_sha256) == 64
    assert not loaded.training


def test_checksum_refuses_tampered_weights(tmp_path):
    make_artifact(tmp_path)
    data = bytearray((tmp_path / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(model.ModelArtifactError, match="checksum"):
        model.load_model(tmp_path)


def test_weights_of_another_model_are_refused(tmp_path):
    a, b = make_artifact(tmp_path / "a", seed=1), make_artifact(tmp_path / "b", seed=2)
    shutil.copy(b / WEIGHTS_FILE, a / WEIGHTS_FILE)
    with pytest.raises(model.ModelArtifactError, match="checksum"):
        model.load_model(a)


def test_architecture_mismatch_is_refused(tmp_path):
    make_artifact(tmp_path, "resnet18")
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["architecture"] = "resnet50"
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(model.ModelArtifactError, match="do not fit architecture"):
        model.load_model(tmp_path)


@pytest.mark.parametrize("breakage, match", [
    (lambda d: (d / META_FILE).unlink(), "not a model directory"),
    (lambda d: (d / WEIGHTS_FILE).unlink(), "No weights.safetensors"),
    (lambda d: (d / META_FILE).write_text("{not json"), "not valid JSON"),
    (lambda d: (d / META_FILE).write_text(json.dumps({"format_version": 99})), "format_version 99"),
    (lambda d: (d / META_FILE).write_text(json.dumps({"format_version": 1, "architecture": "resnet18"})), "lacks required"),
])
def test_broken_artifacts_have_clear_errors(tmp_path, breakage, match):
    make_artifact(tmp_path)
    breakage(tmp_path)
    with pytest.raises(model.ModelArtifactError, match=match):
        model.load_model(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(model.ModelArtifactError, match="not found"):
        model.load_model(tmp_path / "nowhere")


def test_env_var_selects_model(tmp_path, monkeypatch):
    make_artifact(tmp_path)
    monkeypatch.setenv("CXR_MODEL_DIR", str(tmp_path))
    assert model.load_model().directory == tmp_path


def test_weights_are_safetensors_not_pickle(tmp_path):
    make_artifact(tmp_path)
    head = (tmp_path / WEIGHTS_FILE).read_bytes()[:16]
    assert not head.startswith(b"PK") and not head.startswith(b"\x80")  # neither zip (torch.save) nor pickle


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_weights_and_gate_get_the_permissions_of_any_other_file(tmp_path, mask):
    """safetensors alone writes 0600 (through a private temporary file): a service account or a
    container's non-root user could not read the model. The umask decides, as for model.json."""
    import os

    from model.gate import GATE_FILE
    old = os.umask(mask)
    try:
        d = make_artifact(tmp_path / "a")
        clf = model.load_model(d)
        imgs = torch.randint(0, 256, (24, 1, 64, 64), dtype=torch.uint8)
        from training.fit_gate import fit_and_store

        fit_and_store(d, imgs, torch.tensor([0, 1] * 12), imgs[::2])
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    for name in ("weights.safetensors", GATE_FILE, "model.json"):
        assert stat.S_IMODE((d / name).stat().st_mode) == want, name
    assert clf is not None and model.load_model(d).has_gate  # and it still loads
