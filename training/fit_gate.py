"""Fit a model's input gate on its own training films and store it in its artifact.

    python -m training.fit_gate --model runs/resnet18 --data-dir ../shared/data/chest_xray

``training.train`` calls :func:`fit_and_store` at the end of every run, so a retrained model carries
its own gate; this CLI (re)fits the gate of an existing artifact, e.g. one trained before the gate
existed. It reads the artifact's ``split.csv``, so the gate sees exactly the films the model was
trained and validated on. The weights are untouched (their checksum stays valid).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from model import load_model
from model.artifact import META_FILE, SPLIT_FILE, ModelArtifactError
from model.gate import fit_gate, gate_layers

from .data import DataError, load_images, read_split


def fit_and_store(directory: str | Path, train_images: torch.Tensor, train_labels: torch.Tensor,
                  val_images: torch.Tensor, max_val_flag_rate: float = 0.005) -> dict:
    """uint8 N x 1 x S x S training and validation films -> the gate block now in model.json."""
    directory = Path(directory)
    clf = load_model(directory)
    _, train_feats = clf.features(clf.meta.normalize(train_images))
    _, val_feats = clf.features(clf.meta.normalize(val_images))
    layers = gate_layers(clf.meta.architecture)
    gate = fit_gate({n: train_feats[n] for n in layers}, train_labels, {n: val_feats[n] for n in layers},
                    max_val_flag_rate)
    clf.meta.gate = gate.save(directory)
    (directory / META_FILE).write_text(clf.meta.to_json())
    return clf.meta.gate


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fit a model's input gate on its training films",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (with split.csv)")
    p.add_argument("--data-dir", default=os.environ.get("CXR_DATA_DIR"), help="root the split's paths are relative to")
    p.add_argument("--max-val-flag-rate", default=0.005, type=float, help="share of validation films the threshold flags")
    p.add_argument("--cache-dir", default=os.environ.get("CXR_CACHE_DIR", str(Path.home() / ".cache" / "cxr-pneumonia")))
    p.add_argument("--quiet", action="store_true")
    return p


def main(args) -> dict:
    directory = Path(args.model)
    split = directory / SPLIT_FILE
    meta = load_model(directory).meta
    train_s = read_split(split, "train", root=args.data_dir)
    val_s = read_split(split, "val", root=args.data_dir)
    tr_img, tr_y, _, skipped = load_images(train_s, meta.input_size, args.cache_dir or None, progress=not args.quiet)
    va_img, _, _, skipped_va = load_images(val_s, meta.input_size, args.cache_dir or None, progress=not args.quiet)
    block = fit_and_store(directory, tr_img, tr_y, va_img, args.max_val_flag_rate)
    print(f"input gate fitted on {len(tr_y)} training films, threshold {block['threshold']:.3f}, "
          f"flags {block['val_flag_rate']:.2%} of {len(va_img)} validation films; skipped {len(skipped) + len(skipped_va)}")
    return block


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (DataError, ModelArtifactError) as err:
        sys.exit(f"error: {err}")
