"""Cold start: serving a prediction, its default heatmap and overlay imports none of the heavy libraries
(checked in a fresh interpreter).

torchvision (~4 s here, it pulls in torch._dynamo), scikit-learn (~2.5 s), pytorch-grad-cam (which
pulls in all of them plus matplotlib and OpenCV) are needed for training, the report page and the
alternative heatmap methods, and are imported there, when first used.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ["torchvision", "sklearn", "pytorch_grad_cam", "cv2", "matplotlib"]

SCRIPT = """
import json, sys
import numpy as np
import model
clf = model.load_model()
img = (np.arange(300 * 250) % 251).astype(np.uint8).reshape(300, 250)
p = clf.predict_proba(img)
preds = clf.predict([img, img], heatmaps=True)
rgb = model.overlay(img, clf.analyze(img).heatmap, 0.4)  # the default heatmap and its overlay, as the API sends them
assert p.shape == (1,) and 0.0 <= p[0] <= 1.0 and len(preds) == 2 and rgb.shape == (300, 250, 3)
print(json.dumps({"type": type(clf._net).__module__,
                  "loaded": sorted(m for m in HEAVY if m in sys.modules or any(k.startswith(m + ".") for k in sys.modules))}))
"""


def test_prediction_path_imports_nothing_heavy():
    code = f"HEAVY = {HEAVY!r}\n" + SCRIPT
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["type"] == "model.resnet"
    assert result["loaded"] == [], f"the prediction path imported {result['loaded']}"


def test_model_registry_imports_nothing_heavy():
    code = f"HEAVY = {HEAVY!r}\n" + (
        "import sys, model\nmodel.list_models(); model.create_model('resnet50')\n"
        "from model import metrics, report\n"
        "print([m for m in HEAVY if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
