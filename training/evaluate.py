"""Score a model on a labelled split and write the report the Model Report page reads.

    python -m training.evaluate --model assets/model --data-dir ../shared/data/chest_xray --split test --out report.json

Report format (JSON, ``format_version`` 1):

- ``model``: name, architecture, weights_sha256, temperature
- ``data``: source, split, n, n_positive, n_negative, skipped (unreadable files with reasons)
- ``threshold`` and ``operating_points``: the model's own (chosen on its validation split; never
  re-tuned on the data being evaluated)
- ``auc``: value, ci95 (stratified percentile bootstrap), n_boot
- ``metrics``: for ``default`` and each operating point: threshold, accuracy, sensitivity,
  specificity, ppv, npv, f1, brier, ece, confusion_matrix {tn, fp, fn, tp}
- ``calibration``: temperature, bias, and reliability bins (+ ECE, Brier) for ``uncalibrated``
  (softmax of the raw logits) and ``calibrated`` scores
- ``items``: one row per image: file, label (class name), y (0/1), score (calibrated
  P(pneumonia)), score_uncalibrated
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import brier_score_loss

from model import Classifier, load_model
from model.artifact import ModelArtifactError
from model.metrics import auc_with_ci, reliability, summary
from model.report import ReportError

from .data import CLASS_NAMES, DataError, Sample, load_images, load_samples, read_split
from .integrity import check_disjoint, drop_duplicates

REPORT_VERSION = 1


def score_samples(clf: Classifier, samples: list[Sample], batch_size: int = 64, cache_dir=None, workers: int = 2, progress: bool = True):
    """Raw logits for every readable sample (through the shared preprocessing)."""
    images, labels, kept, skipped = load_images(samples, clf.meta.input_size, cache_dir, workers, progress)
    batch = clf.meta.normalize(images)
    return clf.logits(batch, batch_size), labels.numpy(), kept, skipped


def build_report(clf: Classifier, logits: torch.Tensor, y: np.ndarray, samples: list[Sample], source: str, split: str,
                 skipped: list[str] = (), n_boot: int = 1000, root: str | Path | None = None) -> dict:
    meta = clf.meta
    p = clf._probs(logits)
    p_raw = clf._probs(logits, calibrated=False)
    points = {"default": meta.threshold, **meta.operating_points}

    def name(s: Sample) -> str:
        if root is not None:
            try:
                return str(Path(s.path).resolve().relative_to(Path(root).resolve()))
            except ValueError:
                pass
        return Path(s.path).name

    return {
        "format_version": REPORT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": clf.name, "architecture": meta.architecture, "weights_sha256": meta.weights_sha256,
                  "temperature": meta.temperature, "bias": meta.bias},
        "data": {"source": source, "split": split, "n": int(len(y)), "n_positive": int(y.sum()),
                 "n_negative": int(len(y) - y.sum()), "skipped": list(skipped)},
        "threshold": meta.threshold,
        "operating_points": dict(meta.operating_points),
        "auc": auc_with_ci(y, p, n_boot=n_boot),
        "metrics": {k: summary(y, p, t) for k, t in points.items()},
        "calibration": {
            "temperature": meta.temperature,
            "bias": meta.bias,
            "uncalibrated": {**reliability(y, p_raw), "brier": float(brier_score_loss(y, p_raw))},
            "calibrated": {**reliability(y, p), "brier": float(brier_score_loss(y, p))},
        },
        "items": [
            {"file": name(s), "label": CLASS_NAMES[int(t)], "y": int(t), "score": float(a), "score_uncalibrated": float(b)}
            for s, t, a, b in zip(samples, y, p, p_raw)
        ],
    }


def format_report(report: dict) -> str:
    auc = report["auc"]
    d = report["data"]
    lines = [
        f"{report['model']['name']} on {d['split']} ({d['n']} images: {d['n_positive']} pneumonia, {d['n_negative']} normal"
        + (f"; {len(d['skipped'])} skipped" if d["skipped"] else "") + ")",
        f"AUC {auc['value']:.4f}  " + (f"(95% CI {auc['ci95'][0]:.4f}-{auc['ci95'][1]:.4f})   " if auc.get("ci95") else "(no CI: --n-boot 0)   ") +
        f"ECE {report['calibration']['uncalibrated']['ece']:.4f} -> {report['calibration']['calibrated']['ece']:.4f} "
        f"with T={report['calibration']['temperature']:.3f}, b={report['calibration'].get('bias', 0.0):+.3f}",
        "",
        f"{'operating point':<18}{'thr':>7}{'acc':>7}{'sens':>7}{'spec':>7}{'PPV':>7}{'NPV':>7}{'F1':>7}{'Brier':>7}   TN  FP  FN  TP",
    ]
    for k, m in report["metrics"].items():
        cm = m["confusion_matrix"]
        lines.append(
            f"{k:<18}{m['threshold']:>7.3f}{m['accuracy']:>7.3f}{m['sensitivity']:>7.3f}{m['specificity']:>7.3f}"
            f"{m['ppv']:>7.3f}{m['npv']:>7.3f}{m['f1']:>7.3f}{m['brier']:>7.3f}  {cm['tn']:>4}{cm['fp']:>4}{cm['fn']:>4}{cm['tp']:>4}"
        )
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a chest X-ray model artifact on labelled data", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model directory; when unset: $CXR_MODEL_DIR, else assets/model")
    p.add_argument("--data-dir", default=None, help="root in Kaggle layout: <root>/<split>/{NORMAL,PNEUMONIA}")
    p.add_argument("--split", default="test", help="sub-folder of --data-dir to score")
    p.add_argument("--manifest", default=None, help="CSV with path,label[,patient_id] instead of --data-dir")
    p.add_argument("--split-file", default=None,
                   help="a split.csv written by training; scores its --subset (paths relative to --data-dir)")
    p.add_argument("--subset", default="val", help="subset of --split-file to score")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--batch-size", default=64, type=int, help="images per forward pass")
    p.add_argument("--workers", default=2, type=int, help="decode threads")
    p.add_argument("--n-boot", default=1000, type=int, help="bootstrap resamples for the AUC CI (0: no interval)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--cache-dir", default=None, help="reuse decoded images (same cache as training)")
    return p


class UsageError(Exception):
    """A bad command line (paths that cannot work): one line on stderr, exit code 2."""


def check_out_path(out: str | Path) -> Path:
    """Refuse an --out that cannot be written, before any scoring work starts."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name, e.g. {out / 'report.json'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {out}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"--out {out}: no permission to write in {parent}")
            break
    if out.exists() and not os.access(out, os.W_OK):
        raise UsageError(f"--out {out}: the file exists and is not writable")
    return out


def main(args) -> dict:
    if args.out:
        check_out_path(args.out)
    try:
        clf = load_model(args.model, device=args.device)
    except ValueError as err:  # e.g. an unknown architecture named in model.json
        raise ModelArtifactError(f"the model could not be loaded: {err}") from None
    if args.split_file:
        samples = read_split(args.split_file, args.subset, root=args.data_dir)
        source, split = args.split_file, args.subset
        if args.subset != "train":  # a leak in the split would make these figures measure training images
            try:
                train_rows = read_split(args.split_file, "train", root=args.data_dir)
            except DataError:
                train_rows = []  # a split file without a usable train subset: nothing to compare with
            check_disjoint(train_rows, samples, args.workers)
    else:
        samples = load_samples(args.data_dir, args.split, args.manifest)
        source, split = (args.manifest or args.data_dir), (None if args.manifest else args.split)
    samples = drop_duplicates(samples, warn=lambda msg: print(msg, file=sys.stderr), workers=args.workers)
    logits, y, kept, skipped = score_samples(clf, samples, args.batch_size, args.cache_dir, args.workers)
    report = build_report(clf, logits, y, kept, str(source), split or "manifest", skipped, args.n_boot, root=args.data_dir)
    print(format_report(report))
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        except OSError as err:
            raise UsageError(f"could not write the report to {args.out}: {err.strerror or err}") from None
        print(f"report written to {args.out}")
    return report


def cli(argv: list[str] | None = None) -> int:
    """Run from the command line: problems with the inputs are one line on stderr and exit code 2."""
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (UsageError, DataError, ModelArtifactError, ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
