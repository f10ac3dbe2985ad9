"""Repository hygiene: pinned environment in sync, no data or stray checkpoints committed."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPORT = ["uv", "export", "--format", "requirements-txt", "--no-hashes", "--no-dev", "--no-emit-project", "--locked"]


def _body(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_requirements_txt_matches_uv_lock():
    if shutil.which("uv") is None:
        if os.environ.get("CI"):
            pytest.fail("uv is required in CI")
        pytest.skip("uv not installed")
    exported = subprocess.run(EXPORT, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    current = (ROOT / "requirements.txt").read_text()
    assert _body(exported) == _body(current), (
        "requirements.txt is out of date; regenerate with:\n  " + " ".join(EXPORT) + " -o requirements.txt")


def test_torch_pair_is_pinned():
    reqs = _body((ROOT / "requirements.txt").read_text())
    assert "torch==2.13.0" in reqs and "torchvision==0.28.0" in reqs


def test_no_data_or_checkpoints_tracked():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    images = [f for f in files if f.lower().endswith((".jpeg", ".jpg", ".dcm")) and not f.startswith("docs/")]
    assert not images, f"image data must not be committed: {images[:5]}"
    weights = [f for f in files if f.endswith((".pt", ".pth", ".ckpt", ".safetensors"))]
    # the one shipped model: its weights and the statistics of its input gate
    assert weights in ([], ["assets/model/gate.safetensors", "assets/model/weights.safetensors"]), weights
