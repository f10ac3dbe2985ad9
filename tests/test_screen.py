"""The batch CLI ``python -m model.screen``: discovery, rows, errors, resume after a kill, torchrun merge.

A tiny random-weight model keeps it fast; the inputs are real films, a corrupt file and generated DICOMs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model import screen
from model.decision import DEFAULT_BAND, decide
from tests.conftest import ROOT, dicom_bytes, gradient_image

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, real_images) -> Path:
    """8 real films (4 in a sub-folder), a truncated JPEG, a DICOM with and one without extension and
    preamble, plus files a folder scan must skip (notes, hidden)."""
    d = tmp_path_factory.mktemp("archive")
    (d / "sub").mkdir()
    for i, f in enumerate(real_images["NORMAL"] + real_images["PNEUMONIA"]):
        (d / ("sub" if i % 2 else "") / f.name).write_bytes(f.read_bytes())
    (d / "broken.jpeg").write_bytes(real_images["NORMAL"][0].read_bytes()[:600])
    pixels = (np.kron(gradient_image(100, 80), np.ones((2, 2))) * 16).astype(np.uint16)
    (d / "film.dcm").write_bytes(dicom_bytes(pixels))
    (d / "sub" / "1.2.840.10008.99").write_bytes(dicom_bytes(pixels, preamble=False))  # PACS-style name
    (d / "notes.txt").write_text("not an image")
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return d


def read(path: Path, fmt: str = "csv") -> list[dict]:
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_cli(*args) -> int:
    return screen.main([str(a) for a in args] + ["--quiet"])


def test_folder_rows_match_predict(archive, tiny_artifact, tiny_classifier, tmp_path):
    out, heat = tmp_path / "r.csv", tmp_path / "heat"
    assert run_cli(archive, "--recursive", "--out", out, "--model", tiny_artifact, "--workers", 1,
                   "--batch-size", 4, "--heatmaps", heat) == 0
    rows = {Path(r["file"]).name: r for r in read(out)}
    assert set(rows) == {f.name for f in archive.rglob("*") if f.is_file()} - {"notes.txt", ".DS_Store"}
    for name, r in rows.items():
        assert r["model"] == tiny_classifier.name and r["weights_sha256"] == tiny_classifier.meta.weights_sha256
        assert float(r["threshold"]) == tiny_classifier.threshold and float(r["band"]) == DEFAULT_BAND
        if name == "broken.jpeg":
            assert r["error"] and r["probability"] == "" and r["decision"] == "NOT_ASSESSED"
            continue
        p = float(r["probability"])
        assert p == pytest.approx(tiny_classifier.predict_proba(r["file"])[0], abs=1e-5)
        assert r["decision"] == decide(p, tiny_classifier.threshold, DEFAULT_BAND, flagged=r["flagged"] == "True")
        assert r["error"] == "" and Path(r["heatmap"]).is_file()
    assert len(list(heat.iterdir())) == len(rows) - 1
    # the overlay carries the heatmap of the scoring pass: what the app's analysis draws for that file
    from PIL import Image

    from model.classifier import overlay

    r = next(r for n, r in rows.items() if n != "broken.jpeg")
    a = tiny_classifier.analyze(r["file"])
    written = np.asarray(Image.open(r["heatmap"]), dtype=np.int16)
    assert written.shape[:2] == a.image.shape[:2]
    assert np.abs(written - overlay(a.image, a.heatmap).astype(np.int16)).max() <= 2


def test_manifest_jsonl_threshold_and_resume_guard(archive, tiny_artifact, tmp_path, capsys):
    manifest = tmp_path / "list.csv"
    films = sorted(archive.glob("*.jpeg"))
    rel = [os.path.relpath(f, tmp_path) for f in films] + ["missing.png", os.path.relpath(archive / "notes.txt", tmp_path)]
    manifest.write_text("path,label\n" + "".join(f"{p},x\n" for p in rel))
    out = tmp_path / "r.jsonl"
    common = ["--out", out, "--format", "jsonl", "--model", tiny_artifact, "--workers", 0]
    assert run_cli(manifest, *common, "--threshold", 0.3, "--band", 0) == 0
    rows = read(out, "jsonl")
    assert [Path(r["file"]).name for r in rows] == [Path(p).name for p in rel]
    assert all(r["threshold"] == 0.3 and r["band"] == 0 for r in rows)
    assert [r["decision"] for r in rows if not r["error"]] == [
        "PNEUMONIA" if r["probability"] >= 0.3 else "NORMAL" for r in rows if not r["error"]]
    errors = {Path(r["file"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"missing.png", "notes.txt", "broken.jpeg"} and "not found" in errors["missing.png"]
    # same --out, other threshold: refused (mixing would be wrong), unless --force starts over
    capsys.readouterr()
    assert run_cli(manifest, *common, "--threshold", 0.6) == 2
    assert "--force" in capsys.readouterr().err
    assert run_cli(films[0], *common, "--threshold", 0.6, "--force") == 0
    assert len(read(out, "jsonl")) == 1


@pytest.mark.parametrize("case", ["missing", "empty", "out_dir", "out_parent", "no_path_column"])
def test_bad_input_exits_2_with_one_line(case, archive, tiny_artifact, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.csv").write_text("file\na.png\n")
    paths, out = {"missing": [tmp_path / "nope"], "empty": [tmp_path / "empty"],
                  "no_path_column": [tmp_path / "m.csv"]}.get(case, [archive]), tmp_path / "r.csv"
    out = {"out_dir": tmp_path, "out_parent": tmp_path / "no" / "r.csv"}.get(case, out)
    assert run_cli(*paths, "--out", out, "--model", tiny_artifact) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("screen: error:") and "\n" not in err and "Traceback" not in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        screen.main(["--help"])
    assert exc.value.code == 0 and "(default: 32)" in capsys.readouterr().out


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "model.screen", *map(str, args), "--quiet"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_rows(real_images, tiny_artifact, tmp_path):
    files = real_images["NORMAL"] + real_images["PNEUMONIA"]
    src = tmp_path / "many"
    src.mkdir()
    for i in range(480):  # enough work that the kill lands mid-run
        os.symlink(files[i % len(files)], src / f"{i:04d}.jpeg")
    out, full = tmp_path / "killed.csv", tmp_path / "full.csv"
    args = [src, "--model", tiny_artifact, "--batch-size", 4, "--workers", 0]
    proc = subprocess.Popen(_cmd(*args, "--out", out), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") > 12:  # header + 3 batches
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    partial = len(read(out))
    assert 0 < partial < 480
    assert run_cli(*args, "--out", out) == 0  # resume
    assert run_cli(*args, "--out", full) == 0  # uninterrupted
    resumed, whole = read(out), read(full)
    assert len(resumed) == 480
    probs = {r["file"]: float(r["probability"]) for r in whole}
    assert {r["file"]: r["decision"] for r in resumed} == {r["file"]: r["decision"] for r in whole}
    assert all(abs(float(r["probability"]) - probs[r["file"]]) < 1e-5 for r in resumed)


@pytest.mark.slow
def test_torchrun_two_ranks_merge_equals_single_process(archive, tiny_artifact, tmp_path):
    single, merged = tmp_path / "single.csv", tmp_path / "merged.csv"
    args = [archive, "--recursive", "--model", tiny_artifact, "--workers", 0]
    assert run_cli(*args, "--out", single) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "model.screen",
           *map(str, args), "--out", str(merged), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read(single), read(merged)
    assert [r["file"] for r in a] == [r["file"] for r in b]
    for ra, rb in zip(a, b):
        for field in ("probability", "check_score"):
            pa, pb = ra.pop(field), rb.pop(field)
            assert (pa == pb == "") or abs(float(pa) - float(pb)) < 1e-6
        assert ra == rb
    assert not list(tmp_path.glob("merged.csv.part*"))
