"""Does the score move with how a film was exported? |change in P(pneumonia)| per perturbation.

    uv run python -m benchmarks.robustness [--model assets/model] [--compare OTHER_MODEL_DIR] [--n 0]

Each validation film (the model's own patient-grouped split) is re-exported the ways real films
differ - a softer device (2x down/up-sampling), gamma, contrast, min-max stretch, window/level, JPEG,
blur, sharpening, noise, a larger original - and scored through the public API exactly as an upload
is. With ``--compare`` a second model is scored on the same films and perturbations, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import model
from model.decision import DEFAULT_BAND, decide
from model.exports import EXPORTS

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
PERTURBATIONS = EXPORTS  # defined once, in model.exports: the diagnose page re-scores a film with the same ones
MAX_TARGET = 0.10  # the target for the largest |dp| of any film under any one perturbation


def max_difference(dp: np.ndarray, dp_other: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """max(dp) - max(dp_other) on the same films, with a 95% paired bootstrap interval over films.

    Why: a maximum over 1034 films rests on the few films at the top of the tail; whether one model's max
    is really lower than another's is a question for resampling, not for the third decimal."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(dp), (n_boot, len(dp)))
    diffs = dp[idx].max(axis=1) - dp_other[idx].max(axis=1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(dp.max() - dp_other.max()), float(lo), float(hi)


def _calls(p: np.ndarray, threshold: float, band: float) -> np.ndarray:
    """The app's own decision for each probability (model.decision), so the benchmark counts what a user sees."""
    return np.array([decide(float(x), threshold, band) for x in p])


def measure(clf: model.Classifier, films: list[np.ndarray], perturbations: dict | None = None,
            band: float = DEFAULT_BAND, per_film: dict | None = None) -> dict[str, dict]:
    """|dp| per perturbation, and ``flips``: films whose decision at the model's default threshold changes
    (what a user would see: the same film called NORMAL from one export and PNEUMONIA from another).
    ``confident_flips``: the same with the app's UNCERTAIN band (+/- ``band``) in place - one export called
    NORMAL and another PNEUMONIA, neither flagged as uncertain: the flips a user would be given no warning of.
    ``over_target``: films whose |dp| exceeds the 0.10 target. ``per_film``, if given, receives each |dp| array."""
    base = clf.predict_proba(films)
    base_calls = _calls(base, clf.threshold, band)
    out = {}
    for name, f in (perturbations or PERTURBATIONS).items():
        p = clf.predict_proba([f(g) for g in films])
        dp = np.abs(p - base)
        if per_film is not None:
            per_film[name] = dp
        calls = _calls(p, clf.threshold, band)
        out[name] = {"mean": round(float(dp.mean()), 4), "max": round(float(dp.max()), 4),
                     "p95": round(float(np.quantile(dp, 0.95)), 4), "over_target": int((dp > MAX_TARGET).sum()),
                     "flips": int((_calls(p, clf.threshold, 0.0) != _calls(base, clf.threshold, 0.0)).sum()),
                     "confident_flips": int(((calls != base_calls) & (calls != "UNCERTAIN")
                                             & (base_calls != "UNCERTAIN")).sum())}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: assets/model or $CXR_MODEL_DIR)")
    p.add_argument("--compare", default=None, help="a second model directory, measured on the same films")
    p.add_argument("--data-dir", default=os.environ.get("CXR_DATA_DIR", str(SHARED / "chest_xray")))
    p.add_argument("--n", type=int, default=0, help="validation films (random sample; 0 = all: the max is a tail figure)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the figures as JSON here")
    args = p.parse_args()

    from training.data import read_split

    clfs = {"model": model.load_model(args.model)}
    if args.compare:
        clfs["compare"] = model.load_model(args.compare)
    samples = read_split(Path(clfs["model"].directory) / "split.csv", "val", root=args.data_dir)
    rng = np.random.default_rng(args.seed)
    if args.n and args.n < len(samples):
        samples = [samples[i] for i in sorted(rng.choice(len(samples), args.n, replace=False))]
    films = [model.decode_image(s.path) for s in samples]
    results, seconds, dps = {}, {}, {}
    for name, clf in clfs.items():  # per perturbation, models interleaved would not change |dp|: it is not a timing
        t0 = time.perf_counter()
        results[name] = measure(clf, films, per_film=dps.setdefault(name, {}))
        seconds[name] = time.perf_counter() - t0
    print(f"|change in P(pneumonia)| on {len(films)} validation films")
    head = f"{'perturbation':16}" + "".join(f"  {c.name[:22]:>22} mean / max / flips" for c in clfs.values())
    print(head)
    for pert in PERTURBATIONS:
        print(f"{pert:16}" + "".join(f"  {results[k][pert]['mean']:>22.4f} / {results[k][pert]['max']:.3f} / "
                                     f"{results[k][pert]['flips']:>5}" for k in clfs))
    for k, clf in clfs.items():
        means = [r["mean"] for r in results[k].values()]
        maxes = [r["max"] for r in results[k].values()]
        flips = sum(r["flips"] for r in results[k].values())
        confident = sum(r["confident_flips"] for r in results[k].values())
        print(f"{clf.name}: worst mean {max(means):.4f}, worst max {max(maxes):.3f}, decisions flipped {flips} "
              f"of {len(films) * len(PERTURBATIONS)}, {confident} of them with neither call inside the "
              f"UNCERTAIN band (+/- {DEFAULT_BAND}) ({seconds[k]:.0f} s)")
    differences = {}
    if "compare" in clfs:
        print(f"max |dp|, {clfs['model'].name} minus {clfs['compare'].name} (95% paired bootstrap over films)")
        for pert in PERTURBATIONS:
            d, lo, hi = max_difference(dps["model"][pert], dps["compare"][pert])
            differences[pert] = {"max_difference": round(d, 4), "ci95": [round(lo, 4), round(hi, 4)]}
            print(f"{pert:16}  {d:+.3f} ({lo:+.3f} to {hi:+.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps({"n_films": len(films), "models": {
            k: {"name": c.name, "weights_sha256": c.meta.weights_sha256, "perturbations": results[k]}
            for k, c in clfs.items()}, **({"max_differences": differences} if differences else {})}, indent=1) + "\n")


if __name__ == "__main__":
    main()
