"""Screen an archive: every image under the given paths -> one results row each (CSV or JSON Lines).

    python -m model.screen PATH [PATH ...] --out results.csv [--recursive] [--heatmaps DIR]
    torchrun --nproc_per_node=N -m model.screen PATH ... --out results.csv     # one shard per rank

Why it is built this way:
- Worker processes decode and shrink images to the model's input square (so only ~37 kB per image
  crosses process boundaries) while the main process runs batched inference: on a small CPU the
  network is the bottleneck, so the decoders must never stall it.
- Rows are appended and flushed per batch, keyed by file path, so a killed run loses at most one batch
  and rerunning with the same ``--out`` only screens what is missing.
- Decisions come from ``model.decision.decide`` with its ``DEFAULT_BAND``: the app, the API and this
  CLI give the same answer for the same file.
- Under ``torchrun`` each rank screens ``inputs[rank::world]`` of the (deterministic) input list into
  its own part file; rank 0 gathers the rows over gloo (no shared filesystem needed) and writes
  ``--out`` in input order.
Unreadable files become rows with ``error`` set; only bad arguments stop the run (exit code 2).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

FIELDS = ["file", "probability", "decision", "flagged", "reason", "check_score", "error", "model", "weights_sha256",
          "threshold", "band", "heatmap"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".dic", ".ima", ".gif", ".webp"}
# Files in folders whose suffix is not above are sniffed: image magic bytes or DICOM (with or without preamble).
MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"GIF8", b"RIFF")


class UsageError(Exception):
    """Bad arguments: reported as one line on stderr with exit code 2."""


# ---- inputs -------------------------------------------------------------------------------------


def key(path: str) -> str:
    """Identity of an input for resuming and merging: the normalised absolute path."""
    return os.path.normpath(os.path.abspath(path))


def looks_like_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head.startswith(MAGIC) or head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00")


def read_manifest(path: Path) -> list[str]:
    """A CSV with a ``path`` column; relative entries are relative to the manifest's folder."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise UsageError(f"manifest {path} has no 'path' column")
        return [str(path.parent / p["path"]) if not os.path.isabs(p["path"]) else p["path"]
                for p in reader if (p["path"] or "").strip()]


def discover(paths: list[str], recursive: bool) -> list[str]:
    """Expand the command-line paths into the ordered, de-duplicated list of inputs.

    Files named explicitly are always screened (a non-image becomes an error row); a ``.csv`` is read as
    a manifest; folders contribute their images in sorted order, hidden files and non-images skipped.
    """
    out: list[str] = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            files = sorted(f for f in (p.rglob("*") if recursive else p.iterdir())
                           if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
            found = [str(f) for f in files if looks_like_image(f)]
            if not found:
                raise UsageError(f"no images in folder {arg}" + ("" if recursive else " (try --recursive)"))
            out += found
        elif p.is_file() and p.suffix.lower() == ".csv":
            found = read_manifest(p)
            if not found:
                raise UsageError(f"manifest {arg} lists no paths")
            out += found
        elif p.is_file():
            out.append(arg)
        else:
            raise UsageError(f"no such file or folder: {arg}")
    seen: set[str] = set()
    return [f for f in out if not (key(f) in seen or seen.add(key(f)))]


# ---- decoding (runs in worker processes) ---------------------------------------------------------


def decode(source, size: int | None = None):
    """Decode with the shared preprocessing (a DecodedImage, which also carries what the input gate
    reads); with ``size``, shrunk to the model's input square so only ~37 kB per image travels from a
    worker to the main process (``Classifier.predict`` then has nothing left to resize)."""
    from . import preprocessing as pre

    d = pre.decode(source)
    return d if size is None else dataclasses.replace(d, gray=pre.resize_square(d.gray, size))


def _safe_decode(path: str, size: int):
    try:
        return path, decode(path, size), None
    except Exception as err:  # one unreadable file must never stop an archive run
        msg = str(err) if type(err).__name__ == "InvalidImageError" else f"{type(err).__name__}: {err}"
        return path, None, " ".join(msg.split())


class _Chunks:
    """Map-style dataset whose items are whole batches, so each worker decodes a batch at a time."""

    def __init__(self, paths: list[str], batch: int, size: int):
        self.chunks = [paths[i:i + batch] for i in range(0, len(paths), batch)]
        self.size = size

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return [_safe_decode(p, self.size) for p in self.chunks[i]]


def _identity(x):
    return x


# ---- results file --------------------------------------------------------------------------------


class Sink:
    """Append-only results file (CSV or JSON Lines); ``rows`` maps input key -> row, old rows included."""

    def __init__(self, path: Path, fmt: str, force: bool, expect: dict):
        self.path, self.fmt = path, fmt
        self.rows = {} if force else read_rows(path, fmt)
        for row in self.rows.values():
            if any(str(row.get(k)) != str(v) for k, v in expect.items()):
                raise UsageError(f"{path} holds results from another model, threshold or band; "
                                 "pass --force to start over, or choose another --out")
        try:
            if not force and path.exists():
                _drop_partial_line(path)
            self.fh = open(path, "w" if force else "a", newline="", encoding="utf-8")
        except OSError as err:
            raise UsageError(f"cannot write --out {path}: {err.strerror or err}") from None
        self.csv = csv.DictWriter(self.fh, FIELDS, extrasaction="ignore") if fmt == "csv" else None
        if self.csv and self.fh.tell() == 0:
            self.csv.writeheader()
            self.fh.flush()

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self.rows[key(row["file"])] = row
            if self.csv:
                self.csv.writerow(row)
            else:
                self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def read_rows(path: Path, fmt: str) -> dict[str, dict]:
    """Rows already in a results file, keyed by input; a half-written last line (killed run) is ignored."""
    if not path.is_file() or path.stat().st_size == 0:
        return {}
    text = path.read_text(encoding="utf-8")
    text = text[: text.rfind("\n") + 1]
    if fmt == "csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames != FIELDS:
            raise UsageError(f"{path} exists but is not a results file of this tool; pass --force to overwrite it")
        rows = list(reader)
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise UsageError(f"{path} exists but is not a JSON Lines results file; pass --force to overwrite it") from None
        if any(not isinstance(r, dict) or "file" not in r for r in rows):
            raise UsageError(f"{path} exists but is not a results file of this tool; pass --force to overwrite it")
    return {key(r["file"]): r for r in rows}


def _drop_partial_line(path: Path) -> None:
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


# ---- screening -----------------------------------------------------------------------------------


def make_row(file: str, ctx: dict, pred=None, error: str | None = None) -> dict:
    from .decision import NOT_ASSESSED, decide

    row = {"file": file, "probability": None, "decision": NOT_ASSESSED, "flagged": None, "reason": None,
           "check_score": None, "error": error, **ctx, "heatmap": None}
    if pred is not None:
        c = pred.check
        row.update(probability=float(pred.probability), flagged=bool(c.flagged), check_score=float(c.score),
                   reason=" ".join(c.reason.split()) if c.reason else None,
                   decision=decide(pred.probability, ctx["threshold"], ctx["band"], flagged=c.flagged))
    return row


def predict_each(clf, images: list, batch_size: int, heatmaps: bool = False) -> list:
    """One batched forward pass; if the batch fails, per image so one bad input costs only its row."""
    try:
        return clf.predict(images, batch_size, heatmaps=heatmaps)
    except Exception:
        out = []
        for img in images:
            try:
                out.append(clf.predict([img], heatmaps=heatmaps)[0])
            except Exception as err:
                out.append(err)
        return out


def write_heatmap(clf, path: str, directory: Path, heatmap=None) -> str:
    """Heatmap overlay PNG (the default method) over the image at its full resolution. The heatmap comes
    from the scoring pass when it carries one; the file is decoded again for the background (the batch
    holds only model-size copies), so ``--heatmaps`` adds a decode and a PNG per file, not a forward pass."""
    from PIL import Image

    from .classifier import overlay

    full = decode(path)
    image = getattr(full, "gray", full)
    if heatmap is None:  # an architecture without a backward-free CAM
        analysis = clf.analyze(image)
        image, heatmap = analysis.image, analysis.heatmap
    name = directory / f"{Path(path).stem}-{hashlib.sha1(key(path).encode()).hexdigest()[:8]}.png"
    Image.fromarray(overlay(image, heatmap)).save(name)
    return str(name)


def screen(clf, todo: list[str], sink: Sink, ctx: dict, batch_size: int, workers: int, heatmaps: Path | None,
           progress: bool = True, desc: str = "screening") -> dict:
    """Screen ``todo`` into ``sink``; returns counts."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    counts = {"screened": 0, "errors": 0}
    if not todo:  # nothing left (a finished run rerun): do not start workers
        return counts
    loader = DataLoader(_Chunks(todo, batch_size, clf.meta.input_size), batch_size=None, num_workers=workers,
                        collate_fn=_identity, prefetch_factor=4 if workers else None)
    with tqdm(total=len(todo), unit="img", desc=desc, disable=not progress, smoothing=0.1) as bar:
        for chunk in loader:
            ok = [(p, img) for p, img, err in chunk if err is None]
            preds = dict(zip((p for p, _ in ok), predict_each(clf, [img for _, img in ok], batch_size,
                                                                    heatmaps=heatmaps is not None)))
            rows = []
            for path, _, err in chunk:
                pred = preds.get(path)
                if isinstance(pred, Exception):
                    pred, err = None, f"{type(pred).__name__}: {pred}"
                row = make_row(path, ctx, pred, err)
                if heatmaps is not None and pred is not None:
                    try:
                        row["heatmap"] = write_heatmap(clf, path, heatmaps, pred.heatmap)
                    except Exception as hm_err:  # a failed overlay must not lose the result
                        print(f"screen: heatmap for {path} failed: {hm_err}", file=sys.stderr)
                rows.append(row)
            sink.write(rows)
            counts["screened"] += len(rows)
            counts["errors"] += sum(r["error"] is not None for r in rows)
            bar.update(len(rows))
    return counts


# ---- command line --------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    from .decision import DEFAULT_BAND, DISCLAIMER

    ap = argparse.ArgumentParser(prog="python -m model.screen", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 description="Screen every image under PATH(s) for pneumonia; one row per input. " + DISCLAIMER)
    ap.add_argument("paths", nargs="+", metavar="PATH", help="image or DICOM files, folders, or a CSV manifest with a 'path' column")
    ap.add_argument("--out", required=True, type=Path, help="results file; rerunning with the same --out resumes")
    ap.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="results file format")
    ap.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the model's own)")
    ap.add_argument("--band", type=float, default=DEFAULT_BAND, help="UNCERTAIN within +/- band of the threshold")
    ap.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    ap.add_argument("--heatmaps", type=Path, default=None, metavar="DIR", help="also write heatmap overlay PNGs (the default heatmap method, Grad-CAM at the last block; full resolution) here (from the scoring pass; each file is decoded again for the background)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    ap.add_argument("--workers", type=int, default=default_workers(), help="decoding processes (0: decode in the main process)")
    ap.add_argument("--model", type=Path, default=None, metavar="DIR", help="model artifact folder (default: $CXR_MODEL_DIR or assets/model)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto = cuda:LOCAL_RANK when available")
    ap.add_argument("--force", action="store_true", help="start over: overwrite --out instead of resuming")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        ap.error("--batch-size must be >= 1 and --workers >= 0")
    return args


def default_workers() -> int:
    """Decoding is ~1 ms per 224 px JPEG and ~25 ms per 2000 px original against ~20+ ms of CPU inference
    per image, so one decoder per spare core keeps the network fed without stealing its cores."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except UsageError as err:
        print(f"screen: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    inputs = discover(args.paths, args.recursive)  # before importing torch: bad paths fail fast
    if args.heatmaps is not None:
        try:
            args.heatmaps.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create --heatmaps folder {args.heatmaps}: {err.strerror or err}") from None
    part = args.out if world == 1 else args.out.with_name(f"{args.out.name}.part{rank}of{world}")
    try:  # fail before the slow model load, not after
        open(part, "a").close()
    except OSError as err:
        raise UsageError(f"cannot write --out {part}: {err.strerror or err}") from None

    import torch

    from .artifact import ModelArtifactError
    from .classifier import load_model

    if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets 1 per process; else share the cores between ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    device = args.device
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        clf = load_model(args.model, device=device)
    except (ModelArtifactError, OSError) as err:
        raise UsageError(f"cannot load the model: {err}") from None
    threshold = clf.threshold if args.threshold is None else args.threshold
    ctx = {"model": clf.name, "weights_sha256": clf.meta.weights_sha256, "threshold": threshold, "band": args.band}
    expect = {k: ctx[k] for k in ("weights_sha256", "threshold", "band")}

    dist = None
    if world > 1:
        import datetime

        import torch.distributed as dist

        # ranks finish at different times on uneven archives: wait long rather than fail the merge
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    final_done = {} if world == 1 or args.force else read_rows(args.out, args.format)
    sink = Sink(part, args.format, args.force, expect)
    shard = inputs[rank::world]
    done = set(sink.rows) | set(final_done)
    todo = [f for f in shard if key(f) not in done]

    start = time.perf_counter()
    counts = screen(clf, todo, sink, ctx, args.batch_size, args.workers, args.heatmaps,
                    progress=not args.quiet and rank == 0, desc="screening" if world == 1 else f"rank 0/{world}")
    sink.close()
    secs = time.perf_counter() - start
    print(f"screen: rank {rank}: " if world > 1 else "screen: ", end="", file=sys.stderr)
    print(f"{counts['screened']} screened ({counts['errors']} unreadable), {len(shard) - len(todo)} already done, "
          f"{secs:.1f} s ({counts['screened'] / max(secs, 1e-9):.1f} img/s)", file=sys.stderr)

    if dist is not None:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(list(sink.rows.values()), gathered, dst=0)
        if rank == 0:
            merge(args.out, args.format, inputs, final_done, gathered)
            print(f"screen: merged {world} parts into {args.out}", file=sys.stderr)
        dist.barrier()
        part.unlink(missing_ok=True)  # merged: the part is no longer needed to resume
        dist.destroy_process_group()
    return 0


def merge(out: Path, fmt: str, inputs: list[str], final_done: dict, parts: list[list[dict]]) -> None:
    """Write all rows in input order (rows of earlier runs for other inputs first), atomically."""
    rows = dict(final_done)
    for part in parts:
        rows.update((key(r["file"]), r) for r in part)
    order = [key(f) for f in inputs]
    wanted = set(order)
    tmp = out.with_name(out.name + ".merging")
    sink = Sink(tmp, fmt, force=True, expect={})
    sink.write([r for k, r in rows.items() if k not in wanted] + [rows[k] for k in order if k in rows])
    sink.close()
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
