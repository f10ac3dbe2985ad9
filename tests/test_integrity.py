"""Training-data faults found by content hash, and training.evaluate's command-line errors."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import evaluate, train
from training.data import DataError, Sample, discover_folder, read_manifest
from training.integrity import check_disjoint, drop_duplicates

ROOT = Path(__file__).resolve().parent.parent


def write_png(path: Path, seed: int) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (80, 80), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id"])
        w.writerows(rows)
    return path


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    return {name: write_png(tmp_path / "img" / f"{name}.png", i) for i, name in enumerate("abcdefgh")}


def test_duplicate_manifest_rows_are_dropped_with_a_warning(tmp_path, images):
    rows = [("img/a.png", "NORMAL", "p1"), ("img/b.png", "PNEUMONIA", "p2"), ("img/a.png", "NORMAL", "p1"),
            ("img/c.png", "PNEUMONIA", "p3")]
    samples = read_manifest(write_manifest(tmp_path / "m.csv", rows))
    warnings: list[str] = []
    kept = drop_duplicates(samples, warn=warnings.append)
    assert [Path(s.path).name for s in kept] == ["a.png", "b.png", "c.png"]  # first occurrence, order kept
    assert len(warnings) == 1 and "dropped 1 exact duplicate" in warnings[0] and "a.png" in warnings[0]


def test_same_content_under_another_name_and_patient_is_a_duplicate(tmp_path, images):
    shutil.copy(images["a"], tmp_path / "img" / "copy_of_a.png")
    rows = [("img/a.png", "NORMAL", "p1"), ("img/copy_of_a.png", "NORMAL", "p9"), ("img/b.png", "PNEUMONIA", "p2")]
    warnings: list[str] = []
    kept = drop_duplicates(read_manifest(write_manifest(tmp_path / "m.csv", rows)), warn=warnings.append)
    assert [Path(s.path).name for s in kept] == ["a.png", "b.png"]
    assert "copy_of_a.png (same content as" in warnings[0]


def test_contradictory_labels_stop_with_the_files_named(tmp_path, images):
    shutil.copy(images["b"], tmp_path / "img" / "b_again.png")
    rows = [("img/a.png", "NORMAL", "p1"), ("img/a.png", "PNEUMONIA", "p1"),  # the same file with both labels
            ("img/b.png", "PNEUMONIA", "p2"), ("img/b_again.png", "NORMAL", "p3"),  # same content, two labels
            ("img/c.png", "NORMAL", "p4")]
    with pytest.raises(DataError, match="2 image\\(s\\) are listed with contradictory labels") as info:
        drop_duplicates(read_manifest(write_manifest(tmp_path / "m.csv", rows)), warn=print)
    msg = str(info.value)
    assert "a.png [NORMAL" in msg and "a.png [PNEUMONIA" in msg and "b_again.png [NORMAL" in msg
    assert "c.png" not in msg


def test_cross_split_duplicate_is_a_leak(tmp_path, images):
    shutil.copy(images["c"], tmp_path / "img" / "c_twin.png")
    s = lambda name, label, patient: Sample(str(tmp_path / "img" / name), label, patient)  # noqa: E731
    train_s = [s("a.png", 0, "p1"), s("c.png", 1, "p3")]
    val_s = [s("b.png", 0, "p2"), s("c_twin.png", 1, "p7")]
    with pytest.raises(DataError, match="1 validation image\\(s\\) have the same content as a training image") as info:
        check_disjoint(train_s, val_s)
    assert "c_twin.png" in str(info.value) and "c.png" in str(info.value)
    check_disjoint(train_s, val_s[:1])  # no shared content: fine


def test_unreadable_files_are_left_for_the_loader(tmp_path, images):
    samples = [Sample(str(images["a"]), 0, "p1"), Sample(str(tmp_path / "gone.png"), 1, "p2")]
    assert drop_duplicates(samples, warn=print) == samples


def test_training_stops_on_contradictions_before_any_work(tmp_path, images):
    rows = [(f"img/{n}.png", label, f"p{n}") for n, label in zip("abcdefgh", ["NORMAL", "PNEUMONIA"] * 4)]
    rows.append(("img/a.png", "PNEUMONIA", "pa"))
    args = train.get_args_parser().parse_args(
        ["--manifest", str(write_manifest(tmp_path / "m.csv", rows)), "--out", str(tmp_path / "out"), "--cache-dir", "",
         "--quiet", "--device", "cpu"])
    with pytest.raises(DataError, match="contradictory labels"):
        train.main(args)
    assert not (tmp_path / "out").exists()


def test_real_train_folder_duplicates(data_dir):
    """The Kaggle train folder holds exact copies: 24 groups, 26 redundant files, each within one patient and label."""
    samples = discover_folder(data_dir, "train")
    warnings: list[str] = []
    kept = drop_duplicates(samples, warn=warnings.append)
    assert len(samples) - len(kept) == 26
    assert "dropped 26 exact duplicate" in warnings[0]
    by_path = {s.path: s for s in samples}
    for line in warnings[0].splitlines()[1:]:
        if "same content as" in line:
            dropped, kept_path = line.strip().removesuffix(")").split(" (same content as ")
            assert by_path[dropped].patient == by_path[kept_path].patient  # so a patient-grouped split never leaks them


# ------------------------------------------------------------------------------------------------
# python -m training.evaluate: one clear line and exit code 2
# ------------------------------------------------------------------------------------------------


def test_evaluate_empty_model_dir(tmp_path, capsys):
    assert evaluate.cli(["--model", str(tmp_path), "--data-dir", str(tmp_path), "--split", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No model.json") and err.count("\n") == 1 and "Traceback" not in err


def _under_a_file(d: Path) -> Path:
    (d / "afile").write_text("x")
    return d / "afile" / "report.json"


@pytest.mark.parametrize("make_out, match", [
    (_under_a_file, "is a file, not a directory"),
    (lambda d: d, "is a directory"),
])
def test_evaluate_bad_out(tmp_path, tiny_artifact, capsys, make_out, match):
    out = make_out(tmp_path)
    assert evaluate.cli(["--model", str(tiny_artifact), "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_evaluate_missing_data(tmp_path, tiny_artifact, capsys):
    assert evaluate.cli(["--model", str(tiny_artifact), "--data-dir", str(tmp_path), "--split", "nope"]) == 2
    assert "Data folder not found" in capsys.readouterr().err


def test_evaluate_module_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "training.evaluate", "--model", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")
