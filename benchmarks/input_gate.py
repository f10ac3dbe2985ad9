"""How well the input gate tells the films the model can read from everything else.

    uv run python -m benchmarks.input_gate [--model assets/model] [--out docs/input_gate.json]

In-distribution: the model's own validation films (patient-grouped, from train; the gate's threshold
was set on them) and the 16-film official ``val`` folder. Out-of-distribution: the real images of
``../shared/data/ood_dev`` by group, pydicom's bundled test files, and synthetic cases (blank, noise,
gradients, rendered text, inverted films as from a misread MONOCHROME1, films rotated 90 degrees).
Per group: how many are flagged (rules + score), files refused at decoding, and the AUROC of the score
alone against the validation films. Nothing here is fitted: the gate was fitted on training films only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import model
from model.preprocessing import InvalidImageError

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def synthetic(val_films: list[np.ndarray], seed: int = 0) -> dict[str, list[np.ndarray]]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    s = 512
    ramp = np.linspace(0, 255, s, dtype=np.float32)
    text = []
    for i in range(6):
        im = Image.new("L", (s, s), 255 if i % 2 else 0)
        d = ImageDraw.Draw(im)
        for row in range(0, s, 24):
            d.text((10, row), f"Lorem ipsum {i} dolor sit amet, report line {row}", fill=0 if i % 2 else 255)
        text.append(np.asarray(im))
    return {
        "synthetic_blank": [np.full((s, s), v, np.uint8) for v in (0, 128, 255)],
        "synthetic_noise": [rng.integers(0, 256, (s, s), dtype=np.uint8) for _ in range(4)]
        + [np.clip(rng.normal(128, 40, (s, s)), 0, 255).astype(np.uint8) for _ in range(4)],
        "synthetic_gradient": [np.tile(ramp, (s, 1)).astype(np.uint8), np.tile(ramp[:, None], (1, s)).astype(np.uint8),
                               ((np.add.outer(ramp, ramp) / 2)).astype(np.uint8),
                               (255 * np.hypot(*np.meshgrid(ramp - 128, ramp - 128)) / 182).clip(0, 255).astype(np.uint8)],
        "synthetic_text": text,
        "inverted_film": [255 - f for f in val_films],
        "rotated_film": [np.ascontiguousarray(np.rot90(f)) for f in val_films],
    }


def pydicom_files() -> list[Path]:
    try:
        from pydicom.data import get_testdata_files
    except ImportError:
        return []
    return sorted(Path(p) for p in get_testdata_files("*.dcm"))


def run(clf: model.Classifier, groups: dict[str, list], batch_size: int = 32) -> dict:
    rows = {}
    for name, items in groups.items():
        decoded, refused = [], 0
        for item in items:
            try:
                decoded.append(item if isinstance(item, np.ndarray) else model.decode(item))
            except InvalidImageError:
                refused += 1
        preds = clf.predict(decoded, batch_size) if decoded else []
        rows[name] = {"n": len(items), "refused_at_decode": refused,
                      "flagged": int(sum(p.check.flagged for p in preds)),
                      "scores": [p.check.score for p in preds],
                      "reasons": sorted({p.check.reason.split(": ", 1)[-1] for p in preds if p.check.flagged})}
    return rows


def summarise(rows: dict, reference: str = "val_films") -> dict:
    from sklearn.metrics import roc_auc_score

    ref = np.asarray(rows[reference]["scores"])
    out = {}
    for name, r in rows.items():
        n_scored = len(r["scores"])
        stopped = r["flagged"] + r["refused_at_decode"]
        row = {"n": r["n"], "refused_at_decode": r["refused_at_decode"], "flagged": r["flagged"],
               "stopped_rate": round(stopped / max(r["n"], 1), 4)}
        if name != reference and n_scored:
            y = np.r_[np.zeros(len(ref)), np.ones(n_scored)]
            row["auroc_vs_val"] = round(float(roc_auc_score(y, np.r_[ref, r["scores"]])), 4)
        row["reasons"] = r["reasons"][:6]
        out[name] = row
    return out


def gate_cost(clf: model.Classifier, film: np.ndarray, reps: int = 40) -> dict:
    """p50 of predict() on one film with and without the gate, interleaved (the machine is noisy)."""
    gate, times = clf.gate, {"with_gate": [], "without_gate": []}
    try:
        for _ in range(3):
            clf.predict([film])
        for _ in range(reps):
            for key, g in (("with_gate", gate), ("without_gate", None)):
                clf.gate = g
                t0 = time.perf_counter()
                clf.predict([film])
                times[key].append(time.perf_counter() - t0)
    finally:
        clf.gate = gate
    p50 = {k: float(np.median(v)) * 1000 for k, v in times.items()}
    return {**{f"{k}_ms_p50": round(v, 2) for k, v in p50.items()},
            "added_ms": round(p50["with_gate"] - p50["without_gate"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: assets/model or $CXR_MODEL_DIR)")
    p.add_argument("--data-dir", default=os.environ.get("CXR_DATA_DIR", str(SHARED / "chest_xray")))
    p.add_argument("--ood-dir", default=str(SHARED / "ood_dev"))
    p.add_argument("--out", default="", help="write the summary as JSON here")
    p.add_argument("--record", action="store_true",
                   help="also store the per-group figures in the model's model.json (the report page shows them)")
    args = p.parse_args()

    from training.data import read_split

    clf = model.load_model(args.model)
    if not clf.has_gate:
        raise SystemExit("This model carries no input gate; fit one with python -m training.fit_gate.")
    val = [s.path for s in read_split(Path(clf.directory) / "split.csv", "val", root=args.data_dir)]
    groups: dict[str, list] = {"val_films": val,
                               "official_val_folder": sorted(str(f) for f in Path(args.data_dir, "val").glob("*/*"))}
    ood = Path(args.ood_dir)
    for sub in sorted(d for d in ood.iterdir() if d.is_dir()) if ood.is_dir() else []:
        groups[f"ood_dev/{sub.name}"] = sorted(str(f) for f in sub.iterdir() if f.is_file())
    groups["pydicom_testfiles"] = [str(f) for f in pydicom_files()]
    films = [model.decode_image(f) for f in val[:20]]
    groups.update(synthetic(films))
    t0 = time.perf_counter()
    summary = summarise(run(clf, groups))
    seconds = time.perf_counter() - t0
    header = f"{'group':32} {'n':>5} {'refused':>8} {'flagged':>8} {'stopped':>8} {'AUROC':>7}"
    print(f"input gate of {clf.name} (threshold {clf.gate.threshold:.3f}); {seconds:.0f} s\n{header}")
    for name, r in summary.items():
        print(f"{name:32} {r['n']:>5} {r['refused_at_decode']:>8} {r['flagged']:>8} {r['stopped_rate']:>8.1%} "
              f"{r.get('auroc_vs_val', float('nan')):>7.3f}")
    non_chest = [k for k in summary if k.startswith("ood_dev/") and k.split("/")[1] in
                 ("xray_other_body_part", "other_modality", "natural_photo")]
    stopped = sum(summary[k]["flagged"] + summary[k]["refused_at_decode"] for k in non_chest)
    total = sum(summary[k]["n"] for k in non_chest)
    print(f"ood_dev non-chest images stopped: {stopped}/{total} = {stopped / max(total, 1):.1%}")
    cost = gate_cost(clf, films[0])
    print(f"cost: predict p50 {cost['with_gate_ms_p50']:.1f} ms with the gate, {cost['without_gate_ms_p50']:.1f} ms "
          f"without: {cost['added_ms']:+.2f} ms")
    if args.record:
        path = Path(clf.directory) / "model.json"
        meta = json.loads(path.read_text())
        meta["gate"]["ood_eval"] = {k: {"n": r["n"], "flag_rate": r["stopped_rate"], "auroc": r.get("auroc_vs_val")}
                                    for k, r in summary.items()}
        path.write_text(json.dumps(meta, indent=2) + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": clf.name, "weights_sha256": clf.meta.weights_sha256,
                                              "threshold": clf.gate.threshold, "groups": summary, "cost": cost,
                                              "ood_dev_non_chest_stopped": [stopped, total]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
