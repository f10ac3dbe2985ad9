"""Throughput of ``python -m model.screen`` against a plain loop over ``predict_proba``, one file at a time.

    uv run python -m benchmarks.screen [--model assets/model] [--n 48] [--rounds 2] [--workers 0 1 2] [--json out.json]

Inputs: real 224 px training JPEGs, and "2000 px originals" made at run time by upscaling them to
2000 x 1700 grayscale JPEGs in a temporary folder (never committed). The variants run interleaved,
round by round, on the same files, so load from other processes hits them alike; the ratio to the plain
loop is the robust figure on a shared machine. Timing covers decoding, inference, writing the rows and
(for the CLI) starting its decoding workers; not loading the model. Target (2-core CPU): >= 150 img/s for
224 px, >= 25 img/s for 2000 px.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import model
from model import screen

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CXR_DATA_DIR", ROOT.parent / "shared" / "data" / "chest_xray"))
TARGETS = {"224": 150, "2000": 25}


def inputs(n: int, tmp: Path) -> dict[str, list[str]]:
    files = sorted((DATA / "train" / "NORMAL").iterdir())[: n // 2] + sorted((DATA / "train" / "PNEUMONIA").iterdir())[: n - n // 2]
    big = []
    for f in files:
        dst = tmp / f"{f.stem}-2000.jpeg"
        Image.open(f).convert("L").resize((2000, 1700), Image.BICUBIC).save(dst, quality=90)
        big.append(str(dst))
    return {"224": [str(f) for f in files], "2000": big}


def run_loop(clf, files: list[str]) -> None:
    for f in files:
        clf.predict_proba(f)


def run_screen(clf, files: list[str], out: Path, workers: int, batch_size: int) -> None:
    ctx = {"model": clf.name, "weights_sha256": clf.meta.weights_sha256, "threshold": clf.threshold, "band": 0.05}
    sink = screen.Sink(out, "csv", force=True, expect={})
    screen.screen(clf, files, sink, ctx, batch_size, workers, None, progress=False)
    sink.close()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=48, help="images per size")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    clf = model.load_model(args.model)
    clf.predict_proba(torch.zeros(clf.meta.input_size, clf.meta.input_size, dtype=torch.uint8).numpy())  # warm up
    results: dict = {"model": clf.name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "machine": platform.processor() or platform.machine(), "n": args.n, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = inputs(args.n, tmp)
        variants = {"plain loop": lambda fs: run_loop(clf, fs)}
        for w in args.workers:
            variants[f"screen, {w} workers"] = lambda fs, w=w: run_screen(clf, fs, tmp / "out.csv", w, args.batch_size)
        for size, files in sets.items():
            rates: dict[str, list[float]] = {name: [] for name in variants}
            names = list(variants)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
                    t = time.perf_counter()
                    variants[name](files)
                    rates[name].append(len(files) / (time.perf_counter() - t))
            loop = statistics.median(rates["plain loop"])
            results[size] = {name: {"img_s": statistics.median(v), "ratio_vs_loop": statistics.median(v) / loop,
                                    "runs": v} for name, v in rates.items()}
    print(f"{'input':>8} | {'variant':<20} | {'img/s':>7} | {'x loop':>6} | target")
    for size in sets:
        for name, r in results[size].items():
            print(f"{size + ' px':>8} | {name:<20} | {r['img_s']:7.1f} | {r['ratio_vs_loop']:6.2f} | >= {TARGETS[size]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
