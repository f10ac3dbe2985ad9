"""The Classifier API on real images: batching, explanations, overlay, and thread safety."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import model
from model.preprocessing import preprocess


@pytest.fixture(scope="module")
def files(real_images):
    return real_images["NORMAL"][:3] + real_images["PNEUMONIA"][:3]


def test_predict_proba_real_images_batched_equals_single(tiny_classifier, files):
    probs = tiny_classifier.predict_proba(files, batch_size=4)
    assert probs.shape == (len(files),) and ((probs >= 0) & (probs <= 1)).all()
    single = np.array([tiny_classifier.predict_proba(f)[0] for f in files])
    np.testing.assert_allclose(probs, single, atol=1e-5)


def test_predict_matches_manual_pipeline(tiny_classifier, files):
    """No hidden preprocessing: predict = softmax(net(preprocess(x)) / T)."""
    meta = tiny_classifier.meta
    x = torch.stack([preprocess(f, meta.input_size, meta.mean, meta.std) for f in files])
    with torch.no_grad():
        expected = torch.softmax(tiny_classifier._net(x) / meta.temperature, 1)[:, 1].numpy()
    np.testing.assert_allclose(tiny_classifier.predict_proba(files), expected, atol=1e-6)


def test_temperature_changes_confidence_not_ranking(tiny_artifact, files):
    a = model.load_model(tiny_artifact)
    b = model.load_model(tiny_artifact)
    b.meta.temperature = 3.0
    pa, pb = a.predict_proba(files), b.predict_proba(files)
    assert np.array_equal(np.argsort(pa), np.argsort(pb))
    assert np.abs(pb - 0.5).max() < np.abs(pa - 0.5).max()


@pytest.mark.parametrize("method", list(model.CAM_METHODS))
def test_explain_every_method(tiny_classifier, files, method):
    heat = tiny_classifier.explain(files[0], method=method)
    assert heat.shape == (224, 224) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0


def test_explain_at_input_size_and_target(tiny_classifier):
    img = np.random.default_rng(0).integers(0, 255, (300, 200), dtype=np.uint8)
    assert tiny_classifier.explain(img, target="normal").shape == (300, 200)
    with pytest.raises(ValueError, match="Unknown CAM method"):
        tiny_classifier.explain(img, method="nope")
    with pytest.raises(ValueError, match="Unknown target"):
        tiny_classifier.explain(img, target="covid")


def test_analyze_probability_equals_predict(tiny_classifier, files):
    """The fused CAM pass reports the same probability as plain prediction."""
    for f in files[:2]:
        assert tiny_classifier.analyze(f).probability == pytest.approx(tiny_classifier.predict_proba(f)[0], abs=1e-5)


def test_concurrent_explain_equals_serial(tiny_classifier, files):
    """8 threads on one shared model (as Streamlit sessions share the cached model) = serial results."""
    jobs = [(f, m) for f in files for m in ("gradcam++", "layercam")]  # the fast path and a backward pass
    serial = [tiny_classifier.explain(f, method=m) for f, m in jobs]
    serial_p = tiny_classifier.predict_proba(files)

    def work(i):
        f, m = jobs[i % len(jobs)]
        if i % 3 == 0:  # interleave plain predictions with CAMs: hooks must not leak into them
            return "p", tiny_classifier.predict_proba(files)
        return i % len(jobs), tiny_classifier.explain(f, method=m)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(48)))
    for key, value in results:
        if key == "p":
            np.testing.assert_allclose(value, serial_p, atol=1e-6)
        else:
            np.testing.assert_allclose(value, serial[key], atol=1e-5)


def test_overlay(files):
    gray = model.decode_image(files[0])
    heat = np.zeros(gray.shape, np.float32)
    heat[:50, :50] = 1.0
    out0 = model.overlay(gray, heat, 0.0)
    assert out0.shape == (*gray.shape, 3) and np.array_equal(out0[..., 0], gray)
    out = model.overlay(gray, heat, 0.7)
    # hot corner turns red, cold region turns blue under the jet colormap
    assert out[10, 10, 0] > out[10, 10, 2] and out[200, 200, 2] > out[200, 200, 0]
    small = model.overlay(gray, heat[::2, ::2], 0.5)  # heatmap of another size is resized
    assert small.shape == out.shape


def test_overlay_accepts_small_display_copies():
    """A display copy of an extreme-aspect film can be narrower than the 64 px upload minimum."""
    thin = np.full((40, 1024), 128, np.uint8)
    assert model.overlay(thin, np.ones((6, 6), np.float32), 0.5).shape == (40, 1024, 3)


def test_predict_accepts_decoded_squares_of_small_models(tmp_path):
    """The app scores the model-input squares; a model trained below 64 px must still work."""
    from tests.conftest import make_artifact

    clf = model.load_model(make_artifact(tmp_path, size=48))
    square = np.full((48, 48), 100, np.uint8)
    assert clf.predict_proba([square]).shape == (1,)
    with pytest.raises(model.InvalidImageError, match="too small"):  # uploads still have the 64 px minimum
        clf.predict_proba(np.full((48, 48, 3), 100, np.uint8))
