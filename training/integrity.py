"""Training-data integrity by content: the same image listed twice, with both labels, or on both sides of a split.

A manifest row repeated, one file copied into two folders, or one film saved under two patient ids all look
like different samples by path. Hashing the bytes (sha256) finds them before any training:

- **exact duplicates** (same content, same label): every copy after the first is dropped, with a warning
  naming them (training on one image twice only overweights it);
- **contradictions** (same content, different labels): ``DataError`` naming the files, since no model can
  learn both answers and the labels need fixing;
- **cross-split duplicates** (same content in train and validation): ``DataError``; the validation figures
  would be measured on training images (a leak). Because exact duplicates are dropped *before* the split,
  identical content can only reach both sides when a split is given from outside (a split file).

The real Kaggle ``train`` folder holds 24 such groups (26 redundant files, every group within one patient and
one label): they are dropped with a warning, never an error.
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from model.artifact import sha256_file

from .data import CLASS_NAMES, DataError, Sample

MAX_NAMED = 30  # files named in one message; the rest are counted

_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash each file once per process


def _digest(path: str) -> str | None:
    try:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        if key not in _digests:
            _digests[key] = sha256_file(path)
        return _digests[key]
    except OSError:
        return None  # unreadable: left for load_images to skip and report


def content_hashes(samples: Iterable[Sample], workers: int = 2) -> list[str | None]:
    """sha256 of each sample's file (None when it cannot be read), in order."""
    paths = [s.path for s in samples]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(_digest, paths))


def _name(s: Sample) -> str:
    return f"{s.path} [{CLASS_NAMES[s.label]}, patient {s.patient}]"


def _listing(lines: list[str]) -> str:
    shown = lines[:MAX_NAMED]
    more = f"\n  ... and {len(lines) - MAX_NAMED} more" if len(lines) > MAX_NAMED else ""
    return "\n  " + "\n  ".join(shown) + more


def drop_duplicates(samples: list[Sample], warn: Callable[[str], None] = print, workers: int = 2) -> list[Sample]:
    """Samples with each image content once (first occurrence kept, order kept).

    Raises ``DataError`` when the same content carries different labels.
    """
    groups: dict[str, list[Sample]] = defaultdict(list)
    keep: list[Sample] = []
    for s, digest in zip(samples, content_hashes(samples, workers)):
        if digest is None:
            keep.append(s)
            continue
        if not groups[digest]:
            keep.append(s)
        groups[digest].append(s)
    conflicts = [g for g in groups.values() if len({s.label for s in g}) > 1]
    if conflicts:
        lines = [" = ".join(_name(s) for s in g) for g in conflicts]
        raise DataError(
            f"{len(conflicts)} image(s) are listed with contradictory labels (same file content, different labels); "
            f"fix the labels or remove the wrong copy:{_listing(lines)}")
    dropped = [(s, g[0]) for g in groups.values() for s in g[1:]]
    if dropped:
        lines = [f"{d.path} (same content as {k.path})" for d, k in dropped]
        warn(f"warning: dropped {len(dropped)} exact duplicate image(s) (same content and label as a file kept):"
             f"{_listing(lines)}")
    return keep


def check_disjoint(train: list[Sample], val: list[Sample], workers: int = 2) -> None:
    """``DataError`` when any image content appears on both sides of a split (a validation leak)."""
    seen: dict[str, Sample] = {}
    for s, digest in zip(train, content_hashes(train, workers)):
        if digest is not None:
            seen.setdefault(digest, s)
    leaks = [(seen[d], s) for s, d in zip(val, content_hashes(val, workers)) if d is not None and d in seen]
    if leaks:
        lines = [f"{_name(v)} = training file {_name(t)}" for t, v in leaks]
        raise DataError(
            f"{len(leaks)} validation image(s) have the same content as a training image (a leak: the validation "
            f"figures would be measured on training data); give each copy the same patient id or remove it:"
            f"{_listing(lines)}")

