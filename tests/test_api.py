"""The HTTP API (FastAPI): /health, /predict, /predict/batch, errors, caps, nothing on disk, the input gate."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import itertools
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

import api
import model
from model.decision import DEFAULT_BAND
from model.gate import InputCheck

MB = 2**20


@pytest.fixture
def client(tiny_artifact, monkeypatch):
    monkeypatch.setenv("CXR_MODEL_DIR", str(tiny_artifact))
    real = api.classifier
    real.cache_clear()
    yield TestClient(api.app)
    real.cache_clear()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A ~5 MB PNG (noise does not compress): well over Starlette's 1 MB spool-to-disk threshold."""
    data = png(np.random.default_rng(0).integers(0, 256, (2300, 2300), dtype=np.uint8))
    assert len(data) > 5 * MB
    return data


# ------------------------------------------------------------------------------------------------
# health, docs, single predictions
# ------------------------------------------------------------------------------------------------


def test_health(client, tiny_artifact):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["weights_sha256"] == model.read_meta(tiny_artifact).weights_sha256
    assert body["model"] == "test-resnet18-64" and body["threshold"] == 0.5
    assert body["default_band"] == DEFAULT_BAND == 0.05  # the app's default: one source
    assert body["has_gate"] is False  # the shipped stub gate; a fitted gate sets clf.has_gate
    assert body["calibrated_prevalence"] is None  # the tiny artifact's model.json does not say
    assert "not a medical device" in body["disclaimer"]
    assert body["limits"]["max_file_bytes"] == model.preprocessing.MAX_FILE_BYTES


def test_health_names_the_class_mix_of_the_calibration(tiny_artifact, tmp_path, monkeypatch):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_artifact, d)
    meta = json.loads((d / "model.json").read_text())
    meta["metrics"] = {**meta.get("metrics", {}), "prevalence": 0.7408}
    (d / "model.json").write_text(json.dumps(meta))
    monkeypatch.setenv("CXR_MODEL_DIR", str(d))
    api.classifier.cache_clear()
    try:
        assert TestClient(api.app).get("/health").json()["calibrated_prevalence"] == 0.7408
    finally:
        api.classifier.cache_clear()


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/health", "/predict", "/predict/batch"} <= set(spec["paths"])
    params = {p["name"]: p for p in spec["paths"]["/predict"]["post"]["parameters"]}
    assert {"threshold", "band", "cam", "opacity", "force"} <= set(params)
    assert all(p.get("description") for p in params.values())
    assert params["band"]["schema"]["default"] == DEFAULT_BAND
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "application/octet-stream" in body
    assert "413" in spec["paths"]["/predict"]["post"]["responses"]


def test_predict_raw_body_and_multipart_agree(client, real_images, tiny_classifier):
    path = real_images["PNEUMONIA"][0]
    data = path.read_bytes()
    raw = client.post("/predict?band=0", content=data, headers={"content-type": "image/jpeg"}).json()
    form = client.post("/predict?band=0", files={"file": (path.name, data, "image/jpeg")}).json()
    expected = tiny_classifier.predict_proba(path)[0]
    assert raw["probability"] == pytest.approx(expected, abs=1e-6) == form["probability"]
    assert raw["decision"] == ("PNEUMONIA" if expected >= 0.5 else "NORMAL")
    assert raw["image_size"] == [224, 224]
    # the input gate's fields are always there (the real, unfitted gate never flags)
    assert raw["input_check"] == {"flagged": False, "score": 0.0, "reason": None}
    assert raw["reliable"] is True and raw["forced"] is False and "warning" not in raw


def test_predict_threshold_band_and_cam(client, real_images):
    data = real_images["NORMAL"][0].read_bytes()
    p = client.post("/predict", content=data).json()["probability"]
    assert client.post(f"/predict?threshold={max(0, p - 0.01)}&band=0", content=data).json()["decision"] == "PNEUMONIA"
    assert client.post(f"/predict?threshold={min(1, p + 0.01)}&band=0", content=data).json()["decision"] == "NORMAL"
    assert client.post(f"/predict?threshold={p}&band=0.05", content=data).json()["decision"] == "UNCERTAIN"
    # default band = the app's (0.05): 0.01 from the threshold is UNCERTAIN without asking for a band
    r = client.post(f"/predict?threshold={min(1, p + 0.01)}", content=data).json()
    assert r["decision"] == "UNCERTAIN" and r["band"] == DEFAULT_BAND
    r = client.post("/predict?cam=gradcam&opacity=0.5", content=data).json()
    img = Image.open(io.BytesIO(base64.b64decode(r["overlay_png_base64"])))
    assert img.size == (224, 224) and img.mode == "RGB"
    assert r["probability"] == pytest.approx(p, abs=1e-5) and r["cam_method"] == "gradcam"


def test_predict_with_exports_re_scores_the_image_as_the_app_does(client, real_images, tiny_classifier):
    path = real_images["NORMAL"][1]
    r = client.post("/predict?exports=true&threshold=0.5&band=0.1", content=path.read_bytes())
    assert r.status_code == 200, r.text
    got = r.json()["export_stability"]
    want = model.export_stability(tiny_classifier, model.decode_image(path))
    assert got["scores"] == pytest.approx(want.scores, abs=1e-6) and list(got["scores"]) == list(model.EXPORTS)
    assert got["probability"] == pytest.approx(want.probability, abs=1e-6)
    assert got["max_change"] == pytest.approx(want.max_change, abs=1e-6)
    assert got["changed_decisions"] == want.changed_decisions(0.5, 0.1) and got["stable"] is want.stable(0.5, 0.1)
    assert "export_stability" not in client.post("/predict", content=path.read_bytes()).json()  # only when asked


@pytest.mark.parametrize("body, query, status, match", [
    (b"not an image", "", 400, "not a recognised image"),
    (b"", "", 400, "empty"),
    (b"x", "?threshold=2", 400, "threshold must be between 0 and 1"),
    (b"x", "?threshold=abc", 400, "could not convert"),
    (b"x", "?threshold=nan", 400, "threshold must be"),
    (b"x", "?band=0.9", 400, "band must be between 0 and 0.5"),
    (b"x", "?opacity=-1", 400, "opacity must be between 0 and 1"),
    (b"x", "?cam=magic", 400, "cam must be one of gradcam"),
    (b"x", "?force=maybe", 400, "force must be true or false"),
])
def test_bad_requests(client, body, query, status, match):
    r = client.post("/predict" + query, content=body)
    assert r.status_code == status and match in r.json()["error"], r.json()


def test_other_errors_are_json_too(client):
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = client.get("/predict")
    assert r.status_code == 405 and "error" in r.json()
    r = client.post("/predict", content=b"x", headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert r.status_code == 400 and "Malformed multipart" in r.json()["error"]
    r = client.post("/predict", content=b"x", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["error"]
    r = client.post("/predict", files={"image": ("a.png", b"123", "image/png")})
    assert r.status_code == 400 and "field named 'file'" in r.json()["error"]
    r = client.post("/predict", files=[("file", ("a.png", b"1", "image/png")), ("file", ("b.png", b"2", "image/png"))])
    assert r.status_code == 400 and "/predict/batch" in r.json()["error"]


def test_missing_model_is_503_without_paths(monkeypatch, tmp_path):
    secret = tmp_path / "private-models" / "nowhere"
    monkeypatch.setenv("CXR_MODEL_DIR", str(secret))
    api.classifier.cache_clear()
    c = TestClient(api.app)
    for r in (c.get("/health"), c.post("/predict", content=b"x"), c.post("/predict/batch", files={"files": ("a", b"x")})):
        assert r.status_code == 503
        text = r.json()["error"]
        assert "unavailable" in text and "private-models" not in text and "/" not in text.replace("/predict", "")
    api.classifier.cache_clear()


# ------------------------------------------------------------------------------------------------
# size caps: 413 before the body is read
# ------------------------------------------------------------------------------------------------


def asgi_post(path: str, headers: dict[str, str], chunks, query: str = ""):
    """Drive the ASGI app directly and count how much of the body it asked for."""
    stats = {"chunks": 0, "bytes": 0}
    it = iter(chunks)

    async def receive():
        chunk = next(it, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        stats["chunks"] += 1
        stats["bytes"] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    asyncio.run(api.app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), stats


def endless(total_mb: int = 250, chunk: int = MB):
    return itertools.repeat(b"\0" * chunk, total_mb * MB // chunk)


@pytest.mark.parametrize("path, ctype", [
    ("/predict", "image/jpeg"),
    ("/predict", "multipart/form-data; boundary=xyz"),
    ("/predict/batch", "multipart/form-data; boundary=xyz"),
])
def test_413_from_content_length_without_reading_the_body(client, path, ctype):
    status, body, stats = asgi_post(path, {"content-type": ctype, "content-length": str(300 * MB)}, endless(300))
    assert status == 413 and "larger than the limit" in body["error"]
    assert stats["chunks"] == 0  # refused from the header: not one chunk was read


def test_413_while_streaming_a_body_without_content_length(client):
    status, body, stats = asgi_post("/predict", {"content-type": "application/octet-stream"}, endless())
    assert status == 413
    cap_mb = api.MAX_FILE_BYTES / MB
    assert stats["bytes"] <= (cap_mb + 1) * MB  # stopped at the cap, not after 250 MB


def test_413_for_one_oversized_multipart_file_while_streaming(client, monkeypatch):
    monkeypatch.setattr(api, "MAX_FILE_BYTES", 2 * MB)
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    status, body, stats = asgi_post("/predict", {"content-type": "multipart/form-data; boundary=xyz"},
                                    itertools.chain([head], endless(total_mb=100, chunk=MB // 4)))
    assert status == 413 and "limit of 2 MB" in body["error"]
    assert stats["bytes"] <= 4 * MB


def test_invalid_content_length(client):
    status, body, _ = asgi_post("/predict", {"content-length": "lots"}, [])
    assert status == 400 and "Content-Length" in body["error"]


# ------------------------------------------------------------------------------------------------
# nothing on disk
# ------------------------------------------------------------------------------------------------


def open_files() -> set[tuple[str, str]]:
    """(fd, target) of this process's descriptors that point into the file system (not pipes, sockets, /dev)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/", "/sys/")):
            out.add((fd, target))
    return out


class FdWatch:
    """Polls /proc/self/fd in a thread while a request runs; ``snapshot()`` can also be called from inside it."""

    def __init__(self):
        self.before = open_files()
        self.seen: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            self.snapshot()
            self._stop.wait(0.0005)

    def snapshot(self):
        self.seen |= open_files() - self.before

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.snapshot()


class SpyClassifier:
    """The real classifier, but every predict() first snapshots the open files (the upload is in hand then)."""

    def __init__(self, clf, watch: FdWatch | None = None):
        self._clf, self.watch = clf, watch

    def __getattr__(self, name):
        return getattr(self._clf, name)

    def predict(self, images, *a, **k):
        if self.watch:
            self.watch.snapshot()
        return self._clf.predict(images, *a, **k)


def test_fd_watch_sees_starlettes_spooled_upload(big_png):
    """Control: the detector catches what request.form() does with a 5 MB upload (a temp file)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    watch = FdWatch()

    async def form_route(request):
        form = await request.form()
        watch.snapshot()
        n = len(await form["file"].read())
        await form.close()
        return JSONResponse({"n": n})

    with watch:
        r = TestClient(Starlette(routes=[Route("/up", form_route, methods=["POST"])])).post(
            "/up", files={"file": ("big.png", big_png, "image/png")})
    assert r.json()["n"] == len(big_png)
    assert watch.seen, "the fd watch should have seen Starlette's temporary file"


@pytest.mark.parametrize("route, field", [("/predict", "file"), ("/predict/batch", "files"), ("/predict", None)])
def test_uploads_never_touch_the_disk(client, big_png, monkeypatch, tiny_classifier, route, field):
    spy = SpyClassifier(tiny_classifier)
    monkeypatch.setattr(api, "classifier", lambda: spy)

    def send():
        if field is None:
            return client.post(route, content=big_png, headers={"content-type": "image/png"})
        return client.post(route, files=[(field, ("big.png", big_png, "image/png"))])

    assert send().status_code == 200  # warm up (lazy imports open files once)
    with FdWatch() as watch:
        spy.watch = watch
        r = send()
    assert r.status_code == 200, r.json()
    assert not watch.seen, f"files opened during the request: {sorted(watch.seen)}"


# ------------------------------------------------------------------------------------------------
# batch
# ------------------------------------------------------------------------------------------------


def test_batch_one_result_per_file_in_order(client, real_images, tiny_classifier):
    good = [real_images["NORMAL"][0], real_images["PNEUMONIA"][0]]
    files = [("files", (good[0].name, good[0].read_bytes(), "image/jpeg")),
             ("files", ("broken.jpg", b"definitely not an image", "image/jpeg")),
             ("files", (good[1].name, good[1].read_bytes(), "image/jpeg")),
             ("files", ("empty.png", b"", "image/png"))]
    r = client.post("/predict/batch?band=0", files=files)
    assert r.status_code == 200
    body = r.json()
    res = body["results"]
    assert [x["index"] for x in res] == [0, 1, 2, 3] and [x["file"] for x in res] == [f[1][0] for f in files]
    assert body["n_files"] == 4 and body["n_errors"] == 2 and body["band"] == 0
    assert "not a recognised image" in res[1]["error"] and "empty" in res[3]["error"]
    expected = tiny_classifier.predict_proba(good)
    for item, p in zip((res[0], res[2]), expected):
        assert item["error"] is None and item["probability"] == pytest.approx(p, abs=1e-6)
        assert item["decision"] == ("PNEUMONIA" if p >= 0.5 else "NORMAL")
        assert item["input_check"]["flagged"] is False and item["reliable"] is True
    single = client.post("/predict?band=0", content=good[1].read_bytes()).json()
    assert single["probability"] == pytest.approx(res[2]["probability"], abs=1e-6)


def test_batch_caps_and_errors(client, real_images, monkeypatch):
    data = real_images["NORMAL"][0].read_bytes()
    monkeypatch.setattr(api, "MAX_FILE_BYTES", len(data) - 1)  # this file is now one byte over the per-file cap
    r = client.post("/predict/batch", files=[("files", ("big.jpg", data, "image/jpeg")), ("files", ("ok.png", png(np.zeros((100, 100), np.uint8) + 99), "image/png"))])
    res = r.json()["results"]
    assert r.status_code == 200 and "larger than the limit" in res[0]["error"] and res[1]["error"] is None
    monkeypatch.setattr(api, "MAX_BATCH_BYTES", 3 * len(data))  # the whole request over the total cap -> 413
    r = client.post("/predict/batch", files=[("files", (f"{i}.jpg", data[:-10], "image/jpeg")) for i in range(4)])
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]
    monkeypatch.setattr(api, "MAX_BATCH_FILES", 2)
    r = client.post("/predict/batch", files=[("files", (f"{i}.png", b"x", "image/png")) for i in range(3)])
    assert r.status_code == 400 and "at most 2" in r.json()["error"]
    r = client.post("/predict/batch", content=data, headers={"content-type": "image/jpeg"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]
    r = client.post("/predict/batch", files={"other": ("a.png", b"x", "image/png")})
    assert r.status_code == 400 and "'files'" in r.json()["error"]


# ------------------------------------------------------------------------------------------------
# input gate contract (model.gate): flagged -> NOT_ASSESSED unless force=true
# ------------------------------------------------------------------------------------------------

FLAG = InputCheck(flagged=True, score=9.5, reason="This does not look like a frontal chest X-ray.")


class FlaggingClassifier(SpyClassifier):
    has_gate = True

    def predict(self, images, *a, **k):
        return [dataclasses.replace(p, check=FLAG) for p in self._clf.predict(images, *a, **k)]

    def analyze(self, image, *a, **k):
        return dataclasses.replace(self._clf.analyze(image, *a, **k), check=FLAG)


@pytest.fixture
def flagging(client, tiny_classifier, monkeypatch):
    monkeypatch.setattr(api, "classifier", lambda: FlaggingClassifier(tiny_classifier))
    return client


def test_flagged_input_is_not_assessed(flagging, real_images):
    data = real_images["PNEUMONIA"][0].read_bytes()
    assert flagging.get("/health").json()["has_gate"] is True
    r = flagging.post("/predict", content=data).json()
    assert r["decision"] == "NOT_ASSESSED" and r["probability"] is None and r["reliable"] is False
    assert r["input_check"] == {"flagged": True, "score": 9.5, "reason": FLAG.reason}
    r = flagging.post("/predict?cam=gradcam", content=data).json()
    assert r["decision"] == "NOT_ASSESSED" and "overlay_png_base64" not in r  # no heatmap on an unreadable image
    r = flagging.post("/predict?exports=true", content=data).json()
    assert r["decision"] == "NOT_ASSESSED" and "export_stability" not in r  # nor a re-export check


def test_force_scores_flagged_input_marked_unreliable(flagging, real_images, tiny_classifier):
    path = real_images["PNEUMONIA"][0]
    p = tiny_classifier.predict_proba(path)[0]
    r = flagging.post("/predict?force=true&band=0", content=path.read_bytes()).json()
    assert r["probability"] == pytest.approx(p, abs=1e-6) and r["decision"] == ("PNEUMONIA" if p >= 0.5 else "NORMAL")
    assert r["reliable"] is False and r["forced"] is True and "unreliable" in r["warning"]
    assert r["input_check"]["flagged"] is True
    r = flagging.post("/predict?force=true&cam=gradcam", content=path.read_bytes()).json()
    assert "overlay_png_base64" in r and r["reliable"] is False


def test_batch_carries_the_input_check(flagging, real_images):
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in real_images["NORMAL"][:2]]
    res = flagging.post("/predict/batch", files=files).json()["results"]
    assert [x["decision"] for x in res] == ["NOT_ASSESSED"] * 2 and all(x["probability"] is None for x in res)
    res = flagging.post("/predict/batch?force=true", files=files).json()["results"]
    assert all(x["decision"] in ("PNEUMONIA", "NORMAL", "UNCERTAIN") and x["reliable"] is False for x in res)


# ------------------------------------------------------------------------------------------------
# many clients at once
# ------------------------------------------------------------------------------------------------


def test_concurrent_clients_get_the_serial_answers(client, real_images):
    """16 threads x 3 requests, good films (with and without a heatmap), a corrupt file and a
    non-image interleaved: every answer equals the serial one; never a 500."""
    from concurrent.futures import ThreadPoolExecutor

    films = [p.read_bytes() for c in real_images.values() for p in c[:2]]
    jobs = [("/predict?band=0", f) for f in films] + [("/predict?band=0&cam=gradcam%2B%2B", films[0]),
                                                      ("/predict", films[1][: len(films[1]) // 3]), ("/predict", b"not an image")]

    def ask(i):
        url, body = jobs[i % len(jobs)]
        r = client.post(url, content=body, headers={"content-type": "application/octet-stream"})
        out = r.json()
        return i % len(jobs), r.status_code, (out.get("probability"), out.get("decision"), out.get("overlay_png_base64"))

    serial = {i: ask(i)[1:] for i in range(len(jobs))}
    assert {s for s, _ in serial.values()} == {200, 400} and serial[len(films)][1][2]  # the heatmap job has its overlay
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(ask, range(3 * 16)))
    for k, status, answer in results:
        assert (status, answer) == serial[k], k
