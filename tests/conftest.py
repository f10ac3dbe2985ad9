"""Shared fixtures: the real data folder (from ../shared, never copied), small random-weight artifacts,
and synthetic inputs in the odd formats users upload."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import model

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("CXR_DATA_DIR", ROOT.parent / "shared" / "data" / "chest_xray"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Every model the suite loads (here, in the API, the app and their subprocesses) scores in fp32, so exact
# comparisons hold on any CPU; bf16 serving is compared with fp32 in test_shipped_model.py.
os.environ["CXR_BF16"] = "0"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "train" / "NORMAL").is_dir():
        msg = f"real data not found at {DATA_DIR} (set CXR_DATA_DIR)"
        if IN_CI:
            pytest.fail(msg)  # CI must never pass by skipping the tests that use real data
        pytest.skip(msg)
    return DATA_DIR


@pytest.fixture(scope="session")
def real_images(data_dir) -> dict[str, list[Path]]:
    """A few real files per class from the official val folder (16 images, not used for training)."""
    return {c: sorted((data_dir / "val" / c).iterdir())[:4] for c in ("NORMAL", "PNEUMONIA")}


def make_artifact(directory: Path, arch: str = "resnet18", size: int = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = model.create_model(arch)
    meta = model.ModelMeta(architecture=arch, input_size=size, mean=0.48, std=0.24, name=f"test-{arch}-{size}",
                           threshold=0.5, operating_points={"youden": 0.4, "high_sensitivity": 0.2, "screening": 0.5})
    return model.save_artifact(directory, net, meta)


def make_artifact_with_report(directory: Path, data_dir: Path, size: int = 64) -> Path:
    """A random-weight model plus a real report, scored on the official 16-image val folder."""
    import json

    from training.data import discover_folder
    from training.evaluate import build_report, score_samples

    d = make_artifact(directory, size=size)
    clf = model.load_model(d)
    logits, y, kept, skipped = score_samples(clf, discover_folder(data_dir, "val"), progress=False)
    (d / "report.json").write_text(json.dumps(build_report(clf, logits, y, kept, "val", "val", skipped, n_boot=50, root=data_dir)))
    return d


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """A random-weight resnet18 at 64 px: exercises every code path, predicts nothing meaningful."""
    return make_artifact(tmp_path_factory.mktemp("artifact"))


@pytest.fixture(scope="session")
def tiny_classifier(tiny_artifact) -> model.Classifier:
    return model.load_model(tiny_artifact, bf16=False)  # exact comparisons; bf16 has its own tests


# ------------------------------------------------------------------------------------------------
# synthetic images
# ------------------------------------------------------------------------------------------------


def gradient_image(h: int = 120, w: int = 90) -> np.ndarray:
    """Asymmetric uint8 test pattern (bright top-left corner) so rotations and flips are detectable."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = (255 * (1 - (yy / h + xx / w) / 2)).astype(np.uint8)
    img[: h // 4, : w // 4] = 255
    return img


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12, preamble: bool = True,
                slope: float = 1.0, intercept: float = 0.0, window: tuple[float, float] | None = None,
                frames: int = 1, pixel_data: bool = True) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    arr = pixels.astype(np.uint16)
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if frames > 1:
        ds.NumberOfFrames = frames
    if pixel_data:
        ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return data[132:] if not preamble else data  # no 128-byte preamble + 'DICM': like some old exports


# ---- pages (AppTest) and the browser (Playwright), shared by the page and e2e test files ---------------

APP = str(ROOT / "streamlit_app.py")
APP_TIMEOUT = 180  # first run imports torch & co; CI machines are slow


@pytest.fixture(scope="module")
def app_model(tmp_path_factory, data_dir) -> Path:
    """A random-weight model with a real report (scored on the official 16-image val folder)."""
    return make_artifact_with_report(tmp_path_factory.mktemp("app_model"), data_dir)


@pytest.fixture
def at(app_model, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CXR_MODEL_DIR", str(app_model))
    app = AppTest.from_file(APP, default_timeout=APP_TIMEOUT)
    app.run()
    assert not app.exception, app.exception
    return app


@pytest.fixture(scope="module")
def browser():
    from benchmarks.harness import CHROMIUM, chromium

    if not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail(f"{CHROMIUM} missing in CI: .ci/run should have installed it")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    with chromium() as b:
        yield b


ARTIFACTS = ROOT / "test-artifacts"  # browser screenshots (ignored by git)


@pytest.fixture
def page(browser, server):
    """A fresh browser context on the running app, once the app is ready."""
    from benchmarks.harness import wait_app_ready

    ARTIFACTS.mkdir(exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    p = ctx.new_page()
    p.goto(server.url)
    wait_app_ready(p, timeout_ms=300_000)  # generous: shared CI/dev machines start torch slowly
    yield p
    ctx.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    """The shipped model when present (what users get; its report's files live under the data folder),
    else a random-weight model with a real report."""
    from benchmarks.harness import StreamlitServer

    model_dir = ROOT / "assets" / "model"
    if not (model_dir / "model.json").is_file():
        model_dir = make_artifact_with_report(tmp_path_factory.mktemp("e2e_model"), data_dir)
    with StreamlitServer(model_dir) as s:
        yield s
