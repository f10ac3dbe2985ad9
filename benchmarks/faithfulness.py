"""How faithful is each heatmap method/layer to this model? ROAD on validation films.

    uv run python -m benchmarks.faithfulness [--model assets/model] [--n 60] [--out docs/faithfulness.json] [--record]

ROAD (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution Methods",
pytorch-grad-cam's ``metrics.road``) replaces a fraction of the pixels by noisy linear imputation from
their neighbours and measures the change of the explained score: removing the *least* relevant
pixels first (LeRF) should change it little, removing the *most* relevant first (MoRF) should lower
it a lot. ``ROADCombined = (LeRF - MoRF) / 2``, averaged over the removal percentiles: higher is more
faithful. The imputation, not the blanking, is what keeps the perturbed images in-distribution.

The explained score is the model's positive-class logit (what the app's heatmaps explain:
``ClassifierOutputTarget(positive class)``); the network is ``model.load_model()``'s, deep-copied,
with the model's own preprocessing (``clf.to_tensor``). Films: the model's ``split.csv`` subset
``val`` (files relative to ``$CXR_DATA_DIR`` or ``../shared/data/chest_xray``), half of each class.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CXR_DATA_DIR", ROOT.parent / "shared" / "data" / "chest_xray"))
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "eigencam": "EigenCAM", "layercam": "LayerCAM"}
PERCENTILES = (20, 40, 60, 80)


def layer_sets(arch: str, multi: tuple[str, ...] = ("layercam",)) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(label, dotted layer paths, methods): last block, the block before, and both (for ``multi`` methods)."""
    from model.registry import cam_layer_path

    last, fine = cam_layer_path(arch), cam_layer_path(arch, fine=True)
    sets = [(last, (last,), tuple(METHODS))]
    if fine != last:
        sets += [(fine, (fine,), tuple(METHODS)), (f"{fine}+{last}", (fine, last), tuple(multi))]
    return sets


def val_films(model_dir: Path, n: int, data_dir: Path = DATA) -> list[tuple[Path, str]]:
    """``n`` validation films from the model's split, evenly spaced within each class, half each."""
    with open(model_dir / "split.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["subset"] == "val"]
    by_class: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["path"]):
        by_class.setdefault(r["label"], []).append(r)
    films = []
    for i, (label, group) in enumerate(sorted(by_class.items())):
        k = min(len(group), n // len(by_class) + (i < n % len(by_class)))
        films += [(data_dir / group[j]["path"], label) for j in np.linspace(0, len(group) - 1, k).round().astype(int)]
    return films


def fast_imputer(noise: float = 0.01):
    """pytorch-grad-cam's ``NoisyLinearImputer`` with the same linear system built in one sparse
    constructor instead of ``lil_matrix`` item assignment (the slow part); equal up to solver rounding
    (``tests/test_faithfulness.py``)."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer, neighbors_weights
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    class FastNoisyLinearImputer(NoisyLinearImputer):
        @staticmethod
        def setup_sparse_system(mask, img, weights=neighbors_weights):
            maskflt, imgflat = mask.flatten(), img.reshape((img.shape[0], -1))
            indices = np.argwhere(maskflt == 0).flatten()
            vidx = np.zeros(len(maskflt), dtype=int)
            vidx[indices] = np.arange(len(indices))
            n = len(indices)
            b, sum_neighbors = np.zeros((n, img.shape[0])), np.ones(n)
            rows, cols, vals = [np.arange(n)], [np.arange(n)], []
            for offset, weight in weights:
                valid, coords = NoisyLinearImputer.add_offset_to_indices(indices, offset, mask.shape)
                vcoords, vids = coords[valid], np.argwhere(valid).flatten()
                known = maskflt[vcoords] > 0.5
                b[vids[known], :] -= weight * imgflat[:, vcoords[known]].T
                unknown = maskflt[vcoords] < 0.5
                rows.append(vids[unknown])
                cols.append(vidx[vcoords[unknown]])
                vals.append(np.full(int(unknown.sum()), weight))
                sum_neighbors[~valid] -= weight
            vals.insert(0, -sum_neighbors)
            A = csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
            return A, b

        def __call__(self, img, mask):
            imgflt = img.reshape(img.shape[0], -1)
            missing = np.argwhere(mask.reshape(-1) == 0).flatten()
            A, b = self.setup_sparse_system(mask.numpy(), img.numpy())
            res = torch.tensor(spsolve(A, b), dtype=torch.float)
            out = imgflt.clone()
            out[:, missing] = res.t() + self.noise * torch.randn_like(res.t())
            return out.reshape_as(img)

    return FastNoisyLinearImputer(noise)


def road_average(percentiles, most_relevant_first: bool, fast: bool = True):
    """Mean over ``percentiles`` of ROAD MoRF or LeRF, as ``ROAD{Most,Least}RelevantFirstAverage``."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                                  RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    remove = RemoveMostRelevantFirst if most_relevant_first else RemoveLeastRelevantFirst
    metrics = [PerturbationConfidenceMetric(remove(p, fast_imputer() if fast else NoisyLinearImputer()))
               for p in percentiles]
    return lambda x, maps, targets, net: np.mean(np.float32([m(x, maps, targets, net) for m in metrics]), axis=0)


def faithfulness(clf, images: list[np.ndarray], methods=tuple(METHODS), percentiles=PERCENTILES,
                 batch_size: int = 8, seed: int = 0, progress: bool = False, fast: bool = True) -> list[dict]:
    """ROAD of every method x layer set for ``clf`` on decoded grayscale ``images``: one row each."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = copy.deepcopy(clf._net).float().to(memory_format=torch.contiguous_format).eval()
    for p in net.parameters():
        p.requires_grad_(True)
    x_all = torch.stack([clf.to_tensor(g) for g in images]).to(clf.device)
    target = ClassifierOutputTarget(clf.meta.positive_index)
    morf_avg, lerf_avg = road_average(percentiles, True, fast), road_average(percentiles, False, fast)
    rows = []
    for label, paths, set_methods in layer_sets(clf.meta.architecture):
        for method in (m for m in methods if m in set_methods):
            layers = [net.get_submodule(p) for p in paths]
            morf, lerf, cam_seconds = [], [], 0.0
            torch.manual_seed(seed)  # the imputation adds noise: same draws for every method
            rng = np.random.default_rng(seed)
            with getattr(pytorch_grad_cam, METHODS[method])(model=net, target_layers=layers) as cam:
                for i in range(0, len(x_all), batch_size):
                    x = x_all[i : i + batch_size]
                    targets = [target] * len(x)
                    t = time.perf_counter()
                    maps = np.nan_to_num(cam(input_tensor=x, targets=targets), nan=0.0).astype(np.float32)
                    cam_seconds += time.perf_counter() - t
                    # break ties at random (a flat map ranks nothing); without it a constant map removes
                    # every pixel at once and the imputation's linear system is singular
                    maps += 1e-6 * rng.random(maps.shape, dtype=np.float32)
                    morf.append(morf_avg(x, maps, targets, net))
                    lerf.append(lerf_avg(x, maps, targets, net))
            morf_a, lerf_a = np.concatenate(morf), np.concatenate(lerf)
            combined = (lerf_a - morf_a) / 2
            rows.append({
                "method": method, "layer": label, "road_combined_mean": float(combined.mean()),
                "road_combined_sd": float(combined.std(ddof=1)) if len(combined) > 1 else 0.0,
                "n": int(len(combined)), "seconds_per_image": cam_seconds / len(combined),
                "morf_mean": float(morf_a.mean()), "lerf_mean": float(lerf_a.mean()),
            })
            if progress:
                r = rows[-1]
                print(f"{method:10s} {label:14s} ROAD {r['road_combined_mean']:+.3f} +- {r['road_combined_sd']:.3f}"
                      f"  ({r['seconds_per_image'] * 1000:.0f} ms/img)", flush=True)
    return rows


def to_markdown(result: dict) -> str:
    rows = sorted(result["rows"], key=lambda r: -r["road_combined_mean"])
    lines = ["| method | layer | ROADCombined (mean ± sd) | MoRF | LeRF | CAM ms/image (batch 8) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | `{r['layer']}` | {r['road_combined_mean']:+.3f} ± {r['road_combined_sd']:.3f} "
                     f"| {r['morf_mean']:+.3f} | {r['lerf_mean']:+.3f} | {r['seconds_per_image'] * 1000:.0f} |")
    return "\n".join(lines)


def write_markdown(result: dict, path: Path) -> None:
    best = result["best"]
    films = result["films"]
    text = f"""# Which heatmap is most faithful to the model?

Measured by `benchmarks/faithfulness.py` ({result['created']}) for `{result['model']}` ({result['architecture']},
{result['input_size']} px) on {films['n']} validation films of its `split.csv` ({', '.join(f'{k}: {v}' for k, v in films['per_class'].items())}),
ROAD percentiles {result['percentiles']}, explaining the {result['target']} logit. Raw figures: `docs/faithfulness.json`.

{to_markdown(result)}

**Most faithful here: {best['method']} at `{best['layer']}`.**

What ROAD measures (Rong et al. 2022, pytorch-grad-cam's `metrics.road`): the pixels a heatmap ranks
most relevant (MoRF) or least relevant (LeRF) are replaced by noisy linear imputation from their
neighbours (which keeps the perturbed film closer to real films than blanking would), at each removal
percentile, and the change of the explained logit is recorded. A faithful map loses a lot when its
top pixels go (MoRF very negative) and little when its bottom pixels go (LeRF near 0 or positive);
`ROADCombined = (LeRF - MoRF) / 2`, averaged over percentiles: **higher is more faithful**. The ± is
the standard deviation over films (the standard error is sd / sqrt(n)). ROAD rewards maps that track
what this network uses, not what a radiologist would point at: it says nothing about clinical validity.
CAM ms/image is the heatmap alone, batch 8, on this shared 2-core CPU ({result['wall_seconds']} s in all).
"""
    path.write_text(text)


def main(argv=None) -> dict:
    import model
    from model.preprocessing import as_gray

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=str(model.default_model_dir()))
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--n", type=int, default=60, help="validation films (half of each class)")
    ap.add_argument("--percentiles", type=int, nargs="+", default=list(PERCENTILES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--library-imputer", action="store_true", help="pytorch-grad-cam's own (slower) imputer")
    ap.add_argument("--out", default=str(ROOT / "docs" / "faithfulness.json"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "faithfulness.md"), help="'' to skip")
    ap.add_argument("--record", action="store_true",
                    help="also store the table with the model (<model>/faithfulness.json), for its report page")
    args = ap.parse_args(argv)

    clf = model.load_model(args.model)
    films = val_films(Path(args.model), args.n, Path(args.data_dir))
    images = [as_gray(p) for p, _ in films]
    t = time.perf_counter()
    rows = faithfulness(clf, images, args.methods, tuple(args.percentiles), progress=True, fast=not args.library_imputer)
    best = max(rows, key=lambda r: r["road_combined_mean"])
    result = {
        "model": clf.name, "architecture": clf.meta.architecture, "input_size": clf.meta.input_size,
        "films": {"n": len(films), "split": "val (split.csv)",
                  "per_class": {c: sum(lab == c for _, lab in films) for c in sorted({lab for _, lab in films})}},
        "metric": "ROADCombined = (LeRF - MoRF) / 2 of the positive-class logit, higher = more faithful",
        "percentiles": list(args.percentiles), "imputer": "library" if args.library_imputer else "fast (same system)", "target": clf.meta.positive_class,
        "best": {"method": best["method"], "layer": best["layer"]},
        "rows": rows, "wall_seconds": round(time.perf_counter() - t, 1),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.record:
        (Path(args.model) / "faithfulness.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        write_markdown(result, Path(args.md))
    print(to_markdown(result))
    print(f"best: {best['method']} @ {best['layer']}; wrote {args.out} ({result['wall_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
