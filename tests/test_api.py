"""The /predict + /health HTTP API."""

import base64
import io

import pytest
from PIL import Image
from starlette.testclient import TestClient

import api
import model


@pytest.fixture
def client(tiny_artifact, monkeypatch):
    monkeypatch.setenv("CXR_MODEL_DIR", str(tiny_artifact))
    api.classifier.cache_clear()
    yield TestClient(api.app)
    api.classifier.cache_clear()


def test_health(client, tiny_artifact):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["weights_sha256"] == model.read_meta(tiny_artifact).weights_sha256


def test_predict_raw_body_and_multipart_agree(client, real_images, tiny_classifier):
    path = real_images["PNEUMONIA"][0]
    data = path.read_bytes()
    raw = client.post("/predict", content=data, headers={"content-type": "image/jpeg"}).json()
    form = client.post("/predict", files={"file": (path.name, data, "image/jpeg")}).json()
    expected = tiny_classifier.predict_proba(path)[0]
    assert raw["probability"] == pytest.approx(expected, abs=1e-6) == form["probability"]
    assert raw["decision"] == ("PNEUMONIA" if expected >= 0.5 else "NORMAL")
    assert raw["image_size"] == [224, 224]


def test_predict_threshold_band_and_cam(client, real_images):
    data = real_images["NORMAL"][0].read_bytes()
    p = client.post("/predict", content=data).json()["probability"]
    assert client.post(f"/predict?threshold={max(0, p - 0.01)}", content=data).json()["decision"] == "PNEUMONIA"
    assert client.post(f"/predict?threshold={min(1, p + 0.01)}", content=data).json()["decision"] == "NORMAL"
    assert client.post(f"/predict?threshold={p}&band=0.05", content=data).json()["decision"] == "UNCERTAIN"
    r = client.post("/predict?cam=gradcam&opacity=0.5", content=data).json()
    png = Image.open(io.BytesIO(base64.b64decode(r["overlay_png_base64"])))
    assert png.size == (224, 224) and png.mode == "RGB"
    assert r["probability"] == pytest.approx(p, abs=1e-5)


@pytest.mark.parametrize("body, query, status, match", [
    (b"not an image", "", 400, "not a recognised image"),
    (b"", "", 400, "empty"),
    (b"x", "?threshold=2", 400, "threshold must be"),
    (b"x", "?threshold=abc", 400, "could not convert"),
    (b"x", "?cam=magic", 400, "cam must be one of"),
])
def test_bad_requests(client, body, query, status, match):
    r = client.post("/predict" + query, content=body)
    assert r.status_code == status and match in r.json()["error"]


def test_missing_model_is_503(monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_MODEL_DIR", str(tmp_path))
    api.classifier.cache_clear()
    c = TestClient(api.app)
    assert c.get("/health").status_code == 503
    assert c.post("/predict", content=b"x").status_code == 503
    api.classifier.cache_clear()
