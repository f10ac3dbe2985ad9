"""Train a pneumonia classifier from scratch and write a model artifact the app loads as is.

    python -m training.train --data-dir ../shared/data/chest_xray --out runs/resnet18
    torchrun --nproc_per_node=2 -m training.train ...   # DistributedDataParallel (gloo on CPU, nccl on CUDA)

Shaped after torchvision's references/classification/train.py: get_args_parser(), main(args),
train_one_epoch(), evaluate().
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from model import ModelMeta, create_model, load_model, save_artifact
from model.artifact import load_artifact, torch_device
from model.artifact import HISTORY_FILE, META_FILE, REPORT_FILE, SPLIT_FILE, ModelArtifactError
from model.classifier import calibrated_probs
from model.metrics import operating_points
from model.preprocessing import SPECTRUM_RINGS, equalize, match_spectrum, normalize, radial_spectrum
from model.registry import PretrainedWeightsUnavailable, get_spec, list_models

from .calibration import fit_calibration
from .data import (
    CLASS_NAMES, AcquisitionPerturb, DataError, XrayTensorDataset, grouped_split, load_images, load_samples, read_split,
    train_transform, write_split,
)
from .evaluate import build_report, format_report
from .fit_gate import fit_and_store
from .integrity import check_disjoint, drop_duplicates

CHECKPOINT_FILE = "checkpoint.pt"


# ------------------------------------------------------------------------------------------------
# distributed helpers
# ------------------------------------------------------------------------------------------------


def init_distributed(args) -> None:
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.rank = int(os.environ.get("RANK", 0))
    args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    args.distributed = args.world_size > 1
    if args.distributed:
        backend = "nccl" if args.device.type == "cuda" else "gloo"
        if args.device.type == "cuda":
            torch.cuda.set_device(args.local_rank)
            args.device = torch.device("cuda", args.local_rank)
        dist.init_process_group(backend=backend)


def is_main(args) -> bool:
    return args.rank == 0


def gather_predictions(args, idx: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collect (index, logits) from every rank, dropping the DistributedSampler's padding duplicates."""
    if not args.distributed:
        return idx, logits
    parts = [None] * args.world_size
    dist.all_gather_object(parts, (idx.cpu(), logits.cpu()))
    all_idx = torch.cat([p[0] for p in parts])
    all_logits = torch.cat([p[1] for p in parts])
    uniq, first = np.unique(all_idx.numpy(), return_index=True)
    return torch.from_numpy(uniq), all_logits[torch.from_numpy(first)]


def all_reduce_mean(args, value: float, count: int) -> float:
    if not args.distributed:
        return value
    t = torch.tensor([value * count, count], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1])


# ------------------------------------------------------------------------------------------------
# one epoch / evaluation
# ------------------------------------------------------------------------------------------------


def autocast(args):
    dtype = torch.float16 if args.device.type == "cuda" else torch.bfloat16
    return torch.autocast(args.device.type, dtype=dtype, enabled=args.amp)


def consistency_loss(logits: torch.Tensor, reference: torch.Tensor, kind: str = "logit", tail: float = 1.0,
                     rank: torch.Tensor | None = None) -> torch.Tensor:
    """How far a perturbed copy's output is from its film's (``reference`` carries a gradient only with
    ``--consistency-symmetric``).

    ``logit``: squared log-odds difference over the batch's variance of log-odds. Why log-odds, not KL:
    calibration moves the served boundary to where the raw softmax is far from 0.5 (v2's served p = 0.5 sat
    at raw p ~ 0.06), where KL is almost blind to shifts that move the served probability by 0.2-0.3.
    Why divided by the spread: a plain squared difference is also met by shrinking every logit, which
    calibration then scales back up, differences included (measured: the class gap halved, the relative
    change grew).

    ``tail`` < 1 averages only the batch's largest fraction of squared differences (a CVaR): the target is a
    maximum over films and exports, and a mean spends its pull on the many films that already hold still.
    ``rank`` (no gradient) picks that fraction instead, e.g. by how far the *served* probability moved: a large
    log-odds change on a confident film moves nothing a user sees.
    """
    if kind == "kl":
        return nn.functional.kl_div(torch.log_softmax(logits, 1), torch.softmax(reference, 1), reduction="batchmean")
    log_odds = logits[:, 1] - logits[:, 0]
    ref_odds = reference[:, 1] - reference[:, 0]
    sq = (log_odds - ref_odds).pow(2)
    if tail < 1.0:
        k = max(1, math.ceil(tail * sq.numel()))
        sq = sq.topk(k).values if rank is None else sq[rank.detach().topk(k).indices]
    return sq.mean() / log_odds.var(unbiased=False).clamp(min=1e-3)


def consistency_weight(args, epoch: int, step: int, steps: int) -> float:
    """The consistency weight at this step: ramped linearly over ``--consistency-warmup`` epochs.

    Why: from scratch, a random network's log-odds move with any perturbation as much as they differ
    between films, so a full-weight invariance term (40 x ~1) drowns the classification loss before there
    is anything to keep invariant (the Pi-model / mean-teacher ramp-up). Fine-tuning starts at full weight.
    """
    if args.consistency_warmup <= 0:
        return args.consistency
    return args.consistency * min(1.0, (epoch + step / max(steps, 1)) / args.consistency_warmup)


def feature_consistency_loss(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Squared distance of a perturbed copy's pooled features (the classifier head's input) from its film's,
    over the batch's total feature variance.

    Why: the log-odds terms see a film's change only along the head's one direction, and most films sit far
    from the boundary, where that change moves nothing a user sees; the films at the top of the robustness
    tail are the few ambiguous ones (v11: P 0.34-0.85). Asking every film's features to hold still teaches the
    invariance from all films at once, including the direction an ambiguous film would move along.
    Divided by the spread, as the log-odds term, so it cannot be met by shrinking the features.
    """
    sq = (features.float() - reference.float()).pow(2).sum(1).mean()
    return sq / features.float().var(0, unbiased=False).sum().clamp(min=1e-6)


class FeatureTap:
    """Keeps the input of a network's classifier head (its pooled features) from the last forward pass."""

    def __init__(self, head: nn.Module):
        self.features = None
        self.handle = head.register_forward_pre_hook(self._keep)

    def _keep(self, module, inputs) -> None:
        self.features = inputs[0]

    def pop(self) -> torch.Tensor:
        features, self.features = self.features, None
        return features.flatten(1)


def served_consistency_loss(logits: torch.Tensor, reference: torch.Tensor, temperature: float, bias: float) -> torch.Tensor:
    """Squared difference of the *served* (calibrated) probabilities of a film and its perturbed copy.

    Why: what a user sees move is the calibrated probability, and it moves only for films near the served
    boundary (dp = p(1 - p) / T x d(log-odds)). A log-odds loss spends most of its pull on confident films
    whose drift nobody sees; this one pulls hardest where p is near 0.5. The calibration is the parent
    model's (``--init-from``), held fixed, so the term can also be met by pushing films off that boundary
    (measured on v3: max change under sharpening 0.214 -> 0.124, but validation AUC -0.0009; docs/recipes.md).
    """
    return served_change(logits, reference, temperature, bias).pow(2).mean()


def served_change(logits: torch.Tensor, reference: torch.Tensor, temperature: float, bias: float) -> torch.Tensor:
    """Per film, how far the served (calibrated) probability of the perturbed copy is from the film's."""
    served = [calibrated_probs(z, temperature, bias, as_numpy=False) for z in (logits, reference)]
    return (served[0] - served[1]).abs()


def train_one_epoch(model, criterion, optimizer, scheduler, loader, args, epoch, scaler=None, ema=None, tap=None) -> dict:
    model.train()
    total, invariance, n, seen, t0 = 0.0, 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main(args) or args.quiet, leave=False)
    for step, (images, target) in enumerate(bar):
        images, target = images.to(args.device, non_blocking=True), target.to(args.device, non_blocking=True)
        with autocast(args):
            if images.ndim == 5:  # (film, same film exported differently): CE on the second (both if symmetric), both scored alike
                reference, images = _channels_last(images[:, 0], args), _channels_last(images[:, 1], args)
                if args.consistency_symmetric:  # both views in one batch, both trained: the film moves too
                    reference_logits, logits = model(torch.cat([reference, images])).float().chunk(2)
                    reference_features, features = tap.pop().chunk(2) if tap is not None else (None, None)
                    classification = (criterion(logits, target) + criterion(reference_logits, target)) / 2
                else:
                    with torch.no_grad():
                        reference_logits = model(reference).float()
                        reference_features = tap.pop() if tap is not None else None
                    logits = model(images).float()
                    features = tap.pop() if tap is not None else None
                    classification = criterion(logits, target)
                weight = consistency_weight(args, epoch, step, len(loader))
                rank = None
                if args.consistency_tail_by == "served":  # the films whose shown probability moved most
                    rank = served_change(logits.detach(), reference_logits.detach(), *args.served_calibration)
                term = weight * consistency_loss(logits, reference_logits, args.consistency_loss, args.consistency_tail, rank)
                if tap is not None:
                    term = term + args.feature_consistency * feature_consistency_loss(features, reference_features)
                invariance += term.item() * len(target)
                loss = classification + term
                if args.served_consistency > 0:
                    loss = loss + args.served_consistency * served_consistency_loss(logits, reference_logits,
                                                                                    *args.served_calibration)
            else:
                loss = criterion(model(_channels_last(images, args)), target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if args.clip_grad_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if args.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total += loss.item() * len(target)
        n += len(target)
        seen += len(target) * args.world_size
        rate = seen / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{total / n:.4f}", img_s=f"{rate:.1f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    seconds = time.perf_counter() - t0
    return {"train_loss": all_reduce_mean(args, total / max(n, 1), n),
            "train_consistency": all_reduce_mean(args, invariance / max(n, 1), n),  # its weighted share of train_loss
            "train_seconds": seconds,
            "train_img_per_s": seen / seconds}


def _channels_last(x: torch.Tensor, args) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


@torch.inference_mode()
def evaluate(model, criterion, loader, args) -> dict:
    """Validation loss, AUC and accuracy (at argmax) over the whole split, gathered across ranks."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    model.eval()
    idx_parts, logit_parts = [], []
    for idx, (images, _target) in loader:
        images = _channels_last(images.to(args.device, non_blocking=True), args)
        with autocast(args):
            logit_parts.append(model(images).float().cpu())
        idx_parts.append(idx)
    idx, logits = gather_predictions(args, torch.cat(idx_parts), torch.cat(logit_parts))
    y = loader.dataset.labels[idx]
    prob = torch.softmax(logits, 1)[:, 1].numpy()
    return {
        "val_loss": float(criterion(logits, y).item()),
        "val_auc": float(roc_auc_score(y.numpy(), prob)),
        "val_accuracy": float(accuracy_score(y.numpy(), (prob >= 0.5).astype(int))),
        "_logits": logits, "_labels": y,
    }


@torch.inference_mode()
def _predict_logits(model, x: torch.Tensor, args, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        with autocast(args):
            out.append(model(_channels_last(x[i : i + batch_size].to(args.device), args)).float().cpu())
    return torch.cat(out)


def _update_bn(model, dataset, args) -> None:
    """Running BatchNorm statistics replaced by their plain average over one pass of ``dataset``
    (torch.optim.swa_utils.update_bn), in fp32 and with a fixed seed: reproducible."""
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(args.seed + 20_000)
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, shuffle=False, num_workers=0)
    update_bn((_channels_last(x.to(args.device), args) for x, _ in loader), model)


class Indexed(torch.utils.data.Dataset):
    """Yields (index, item) so predictions can be gathered across ranks without duplicates."""

    def __init__(self, ds):
        self.ds = ds
        self.labels = ds.labels

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return i, self.ds[i]


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a chest X-ray pneumonia classifier", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("CXR_DATA_DIR"), help="Kaggle layout root (<root>/train/{NORMAL,PNEUMONIA}); env CXR_DATA_DIR")
    p.add_argument("--manifest", default=None, help="CSV path,label[,patient_id] instead of --data-dir")
    p.add_argument("--train-split", default="train", help="sub-folder of --data-dir to train on")
    p.add_argument("--out", required=True, help="artifact directory to write (weights, model.json, report, history, split)")
    p.add_argument("--arch", default="resnet18", choices=list_models())
    p.add_argument("--image-size", default=192, type=int)
    p.add_argument("--epochs", default=16, type=int,
                   help="0 with --init-from: no training; that model's weights are re-finalised (calibration, "
                        "operating points, gate, report) under this run's preprocessing flags")
    p.add_argument("--batch-size", default=32, type=int, help="per process")
    p.add_argument("--lr", default=2e-3, type=float)
    p.add_argument("--weight-decay", default=0.05, type=float)
    p.add_argument("--warmup-epochs", default=1.0, type=float)
    p.add_argument("--label-smoothing", default=0.05, type=float)
    p.add_argument("--clip-grad-norm", default=0.0, type=float,
                   help="clip the gradient norm to this (0: off); keeps a from-scratch run with consistency stable")
    p.add_argument("--equalize", default=True, action=argparse.BooleanOptionalAction,
                   help="histogram-equalise every input (invariance to gamma, contrast, window/level by construction)")
    p.add_argument("--match-spectrum", default=True, action=argparse.BooleanOptionalAction,
                   help="match every input's radial amplitude spectrum to the training films' (invariance to blur, "
                        "sharpening and softer devices, as equalisation gives to gamma and window/level)")
    p.add_argument("--equalize-sigma", default=0.0, type=float,
                   help="read the equalisation mapping from a copy smoothed by this many pixels (invariance to "
                        "sharpening and noise, which spread the histogram at fine scale); 0: from the film itself")
    p.add_argument("--band-limit", default=0.0, type=float,
                   help="low-pass every input with a Gaussian of this sigma, in units of Nyquist (invariance to "
                        "softer devices and down/up-sampling, which erase the upper band); 0: off")
    p.add_argument("--perturb-p", default=0.35, type=float,
                   help="probability of each acquisition perturbation (blur, resampling, gamma, noise, JPEG...); 0 disables")
    p.add_argument("--consistency", default=5.0, type=float,
                   help="weight of the consistency loss between a film and its perturbed copy; 0 trains on one view")
    p.add_argument("--consistency-loss", default="logit", choices=("logit", "kl"),
                   help="logit: squared log-odds difference over the batch's log-odds variance (scale-free, holds where the "
                        "served boundary is); kl: KL of the softmax")
    p.add_argument("--consistency-symmetric", action="store_true",
                   help="train both views (one batch, gradient through the film's own output too); default: the "
                        "film's output is a fixed reference and only the perturbed copy is trained")
    p.add_argument("--consistency-tail", default=1.0, type=float,
                   help="average the consistency term over only this largest fraction of each batch's films (a CVaR "
                        "aimed at the worst export, which the robustness target measures); 1: all films")
    p.add_argument("--consistency-tail-by", default="logit", choices=("logit", "served"),
                   help="which films --consistency-tail keeps: the largest log-odds changes, or the largest changes of the "
                        "served probability under the --init-from model's calibration (films near the decision boundary)")
    p.add_argument("--consistency-warmup", default=0.0, type=float,
                   help="epochs over which the consistency weight ramps linearly from 0 (training from scratch)")
    p.add_argument("--feature-consistency", default=0.0, type=float,
                   help="weight of a consistency term on the pooled features (the classifier head's input) of a film and "
                        "its perturbed copy, over their batch variance: every film's features hold still, not only the "
                        "log-odds; 0 disables")
    p.add_argument("--served-consistency", default=0.0, type=float,
                   help="weight of a second consistency term on the served (calibrated) probability, with the "
                        "--init-from model's calibration: pulls hardest on films near the decision boundary; 0 disables")
    p.add_argument("--init-from", default="", help="model directory whose weights start training (fine-tuning your own model)")
    p.add_argument("--data-description", default="", help="one sentence on the training data, shown in the model card")
    p.add_argument("--bn-update", default=False, action=argparse.BooleanOptionalAction,
                   help="before finalising, re-estimate BatchNorm statistics in one pass over the training films under "
                        "training augmentation (e.g. after --init-from into an architecture whose activations differ; "
                        "measured on v11 -> resnet18_aa it did not help: docs/recipes.md)")
    p.add_argument("--ema-decay", default=0.998, type=float, help="per-step EMA of weights; 0 disables")
    p.add_argument("--patience", default=6, type=int, help="early stopping: epochs without a better val AUC")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--split-file", default=None,
                   help="reuse a split.csv (train/val by file); default with --init-from: that model's own split, "
                        "so fine-tuning never trains on the films its parent was validated on; '' splits afresh")
    p.add_argument("--val-fraction", default=0.2, type=float)
    p.add_argument("--max-per-class", default=None, type=int, help="use at most N images per class (smoke tests)")
    p.add_argument("--workers", default=0, type=int, help="DataLoader workers (augmentation is cheap; 0 is fastest on 2 cores)")
    p.add_argument("--decode-workers", default=2, type=int, help="threads for the one-time decode")
    p.add_argument("--cache-dir", default=os.environ.get("CXR_CACHE_DIR", str(Path.home() / ".cache" / "cxr-pneumonia")),
                   help="on-disk cache of decoded images ('' disables)")
    p.add_argument("--resume", default="", help=f"path to a {CHECKPOINT_FILE} to continue from")
    p.add_argument("--stop-after", default=0, type=int,
                   help="stop this invocation after N epochs (time-sliced/preemptible jobs); continue with --resume")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--amp", default=None, action=argparse.BooleanOptionalAction,
                   help="mixed precision: fp16 on CUDA, bf16 on CPUs with native bf16 (default: on where it is faster)")
    p.add_argument("--pretrained", action="store_true", help="start from ImageNet weights (needs internet)")
    p.add_argument("--min-sensitivity", default=0.95, type=float,
                   help="sensitivity the default (screening) and high-sensitivity operating points must keep")
    p.add_argument("--perturbed-copies", default=2, type=int,
                   help="perturbed copies of the validation split that calibration and thresholds must also hold on")
    p.add_argument("--n-boot", default=1000, type=int, help="bootstrap resamples for the report's AUC CI")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(warmup_steps: int, total_steps: int, floor: float = 0.01):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _first_per_class(samples: list, limit: int | None) -> list:
    return [s for c in (0, 1) for s in [x for x in samples if x.label == c][:limit]] if limit else samples


def main(args) -> Path | None:
    args.device = torch_device(args.device)
    init_distributed(args)
    seed_everything(args.seed)
    if args.amp is None:  # bf16 on a CPU without native support is ~10x slower than fp32 (AVX2-only EPYC, measured)
        args.amp = args.device.type == "cuda" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    args.channels_last = True  # faster on CUDA and on CPU (oneDNN), measured 1.15-1.3x for ResNet-18
    out = Path(args.out)
    log = print if is_main(args) else (lambda *a, **k: None)

    # ---- data: errors surface here, before any training --------------------------------------
    if args.epochs < 0 or (args.epochs == 0 and not args.init_from):
        raise DataError("--epochs must be positive (0 only with --init-from: re-finalise that model's weights).")
    if not (0 <= args.equalize_sigma <= 16 and 0 <= args.band_limit <= 4):
        raise DataError("--equalize-sigma must be 0-16 (pixels) and --band-limit 0-4 (units of Nyquist).")
    if not 0 < args.consistency_tail <= 1:
        raise DataError("--consistency-tail must be in (0, 1]: the fraction of each batch the consistency term averages.")
    if args.consistency_tail < 1 and args.consistency_loss != "logit":
        raise DataError("--consistency-tail averages the log-odds term: it needs --consistency-loss logit.")
    if args.consistency_tail_by == "served" and not args.init_from:
        raise DataError("--consistency-tail-by served needs --init-from (its calibration defines the served probability).")
    pair = args.consistency > 0 and args.perturb_p > 0  # each film trained beside a perturbed copy of itself
    if args.feature_consistency < 0 or (args.feature_consistency > 0 and not pair):
        raise DataError("--feature-consistency must be >= 0 and needs the consistency pair (--consistency > 0, --perturb-p > 0).")
    if args.served_consistency > 0 and not (args.init_from and pair):
        raise DataError("--served-consistency needs --init-from (its calibration defines the served probability) "
                        "and the consistency pair (--consistency > 0, --perturb-p > 0).")
    split_file = args.split_file
    if split_file is None and args.init_from and (Path(args.init_from) / SPLIT_FILE).is_file():
        split_file = str(Path(args.init_from) / SPLIT_FILE)  # fine-tuning must not train on the parent's validation films
    if split_file:
        train_s, val_s = (_first_per_class(read_split(split_file, sub, root=args.data_dir), args.max_per_class)
                          for sub in ("train", "val"))
        train_s, val_s = drop_duplicates(train_s, warn=log), drop_duplicates(val_s, warn=log)
        log(f"split read from {split_file}")
    else:
        samples = _first_per_class(load_samples(args.data_dir, args.train_split, args.manifest), args.max_per_class)
        samples = drop_duplicates(samples, warn=log)  # by content: exact copies dropped, contradictory labels refused
        train_s, val_s = grouped_split(samples, args.val_fraction, args.seed)
    check_disjoint(train_s, val_s)  # no image content on both sides of the split
    cache = args.cache_dir or None
    tr_img, tr_y, train_s, skipped_tr = load_images(train_s, args.image_size, cache, args.decode_workers, is_main(args) and not args.quiet)
    va_img, va_y, val_s, skipped_va = load_images(val_s, args.image_size, cache, args.decode_workers, is_main(args) and not args.quiet)
    skipped = skipped_tr + skipped_va
    for msg in skipped:
        log(f"skipped unreadable image: {msg}")
    unit = functools.partial(equalize, sigma=args.equalize_sigma) if args.equalize else (lambda c: c.float() / 255.0)  # noqa: E731
    band = args.band_limit or None
    spectrum = None
    if args.match_spectrum:  # the training films' mean amplitude per frequency ring: every input is matched to it
        spectrum = torch.cat([radial_spectrum(unit(c)).reshape(-1, SPECTRUM_RINGS + 1) for c in tr_img.split(512)])
        spectrum = [round(float(v), 6) for v in spectrum.mean(0)]
    scaled = torch.cat([match_spectrum(unit(c), spectrum, band) if spectrum or band else unit(c) for c in tr_img.split(512)])
    mean, std = float(scaled.mean()), float(scaled.std())
    del scaled
    counts = torch.bincount(tr_y, minlength=2).float()
    class_weights = (counts.sum() / (2 * counts)).to(args.device)
    log(f"train {len(tr_y)} images ({int(counts[0])} normal, {int(counts[1])} pneumonia; "
        f"{len({s.patient for s in train_s})} patients), val {len(va_y)} images "
        f"({len({s.patient for s in val_s})} patients), skipped {len(skipped)}; mean {mean:.4f} std {std:.4f}")

    norm = functools.partial(normalize, mean=mean, std=std, equalize_hist=args.equalize, spectrum=spectrum,
                             equalize_sigma=args.equalize_sigma, band_limit=band)
    perturb = AcquisitionPerturb(args.perturb_p) if args.perturb_p > 0 else None
    train_ds = XrayTensorDataset(tr_img, tr_y, norm, train_transform(args.image_size), perturb,
                                 views=2 if pair else 1)
    val_ds = Indexed(XrayTensorDataset(va_img, va_y, norm))
    if args.distributed:
        train_sampler = torch.utils.data.distributed.DistributedSampler(train_ds, shuffle=True, seed=args.seed)
        val_sampler = torch.utils.data.distributed.DistributedSampler(val_ds, shuffle=False)
    else:
        train_sampler = torch.utils.data.RandomSampler(train_ds, generator=torch.Generator().manual_seed(args.seed))
        val_sampler = torch.utils.data.SequentialSampler(val_ds)
    train_loader = torch.utils.data.DataLoader(train_ds, args.batch_size, sampler=train_sampler, drop_last=True,
                                               num_workers=args.workers, persistent_workers=args.workers > 0)
    val_loader = torch.utils.data.DataLoader(val_ds, 128, sampler=val_sampler, num_workers=0)
    if len(train_loader) == 0:
        raise DataError(f"Only {len(tr_y)} training images: fewer than one batch of {args.batch_size}.")

    # ---- model, optimiser, schedule ----------------------------------------------------------
    model = create_model(args.arch, num_classes=2, in_chans=1, pretrained=args.pretrained)
    if args.init_from:
        start, start_meta = load_artifact(args.init_from)
        try:  # another architecture only where its weights fit exactly (resnet18 -> resnet18_aa)
            model.load_state_dict(start.state_dict())
        except RuntimeError:
            raise DataError(f"--init-from holds a {start_meta.architecture}, whose weights do not fit --arch {args.arch}.") from None
        args.init_from_sha256 = start_meta.weights_sha256
        args.served_calibration = (start_meta.temperature, start_meta.bias)
        log(f"initialised from {args.init_from} ({start_meta.name}, weights {start_meta.weights_sha256[:12]})")
    model = model.to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True) if args.ema_decay > 0 else None
    tap = None  # registered after the EMA copy, which needs no tap
    if args.feature_consistency > 0:
        tap = FeatureTap(model.get_submodule(get_spec(args.arch).classifier))
    ddp_model = nn.parallel.DistributedDataParallel(model) if args.distributed else model
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=args.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss(weight=class_weights.cpu())
    decay, no_decay = [], []
    for n_, p_ in model.named_parameters():
        (no_decay if p_.ndim <= 1 else decay).append(p_)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(int(args.warmup_epochs * steps), args.epochs * steps))
    scaler = torch.amp.GradScaler("cuda") if args.amp and args.device.type == "cuda" else None

    history, start_epoch, wall_before = [], 0, 0.0
    commands = ["python -m training.train " + " ".join(sys.argv[1:])]
    best = {"val_auc": -1.0, "val_loss": float("inf"), "epoch": -1, "state": None, "source": None}
    if args.resume:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        history, start_epoch, best = ckpt["history"], ckpt["epoch"] + 1, ckpt["best"]
        wall_before = float(ckpt.get("wall_seconds", 0.0))
        commands = list(ckpt.get("commands", [])) + commands
        log(f"resumed from {args.resume} at epoch {start_epoch + 1}")

    # ---- loop --------------------------------------------------------------------------------
    if is_main(args):
        out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        # every epoch's randomness (order, augmentation) derives from (seed, epoch): a resumed run
        # replays exactly what an uninterrupted one would have done
        torch.manual_seed(args.seed + epoch)
        if args.distributed:
            train_sampler.set_epoch(epoch)
        else:
            train_sampler.generator.manual_seed(args.seed + epoch)
        row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0]}
        row.update(train_one_epoch(ddp_model, criterion, optimizer, scheduler, train_loader, args, epoch, scaler, ema, tap))
        t_eval = time.perf_counter()
        candidates = {"model": evaluate(model, eval_criterion, val_loader, args)}
        if ema is not None:
            candidates["ema"] = evaluate(ema.module, eval_criterion, val_loader, args)
        for k, r in candidates.items():
            row.update({f"{key}{'' if k == 'model' else '_ema'}": v for key, v in r.items() if not key.startswith("_")})
        row["eval_seconds"] = time.perf_counter() - t_eval
        row["seconds"] = row["train_seconds"] + row["eval_seconds"]
        improved = False
        for k, r in candidates.items():  # best on val AUC; ties (to 4 d.p.) go to the lower val loss
            key = (round(r["val_auc"], 4), -r["val_loss"])
            if key > (round(best["val_auc"], 4), -best["val_loss"]):
                src = model if k == "model" else ema.module
                best = {"val_auc": r["val_auc"], "val_loss": r["val_loss"], "epoch": epoch + 1, "source": k,
                        "state": {n_: t.detach().cpu().clone() for n_, t in src.state_dict().items()}}
                improved = True
        history.append(row)
        log(f"epoch {epoch + 1:>3}/{args.epochs}  train_loss {row['train_loss']:.4f} (consistency {row['train_consistency']:.4f})  val_loss {row['val_loss']:.4f}  "
            f"val_auc {row['val_auc']:.4f}" + (f"  ema_auc {row['val_auc_ema']:.4f}" if ema is not None else "")
            + f"  {row['train_img_per_s']:.1f} img/s  {row['seconds']:.0f}s" + ("  *" if improved else ""))
        if is_main(args):
            torch.save({"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                        "history": history, "best": best, "wall_seconds": wall_before + time.perf_counter() - t_start, "commands": commands, "args": _jsonable(vars(args))},
                       out / CHECKPOINT_FILE)
        if epoch + 1 - best["epoch"] >= args.patience:
            log(f"early stop: no better validation AUC for {args.patience} epochs")
            break
        if args.stop_after and epoch + 1 - start_epoch >= args.stop_after and epoch + 1 < args.epochs:
            log(f"stopping after {args.stop_after} epoch(s) as asked; continue with --resume {out / CHECKPOINT_FILE}")
            break
    wall = wall_before + time.perf_counter() - t_start  # training time over all invocations of this run

    if args.distributed:
        dist.barrier()
    if not is_main(args):
        dist.destroy_process_group()
        return None

    # ---- finalise: calibrate, choose operating points, write the artifact ---------------------
    epochs_run = len(history)
    if best["state"] is None:  # --epochs 0: the parent's weights as they are; its history is theirs
        best = {"val_auc": None, "epoch": 0, "source": "init_from",
                "state": {n_: t.detach().cpu().clone() for n_, t in model.state_dict().items()}}
        parent_history = Path(args.init_from) / HISTORY_FILE
        history = json.loads(parent_history.read_text()) if parent_history.is_file() else []
    model.load_state_dict(best["state"])
    if args.bn_update:
        _update_bn(model, XrayTensorDataset(tr_img, tr_y, norm, train_transform(args.image_size), perturb), args)
        log("BatchNorm statistics re-estimated over the training films")
    model.eval()
    full_val = torch.utils.data.DataLoader(val_ds, 128, sampler=torch.utils.data.SequentialSampler(val_ds))  # all of it, not a rank's share
    val_eval = evaluate(model, eval_criterion, full_val, argparse.Namespace(**{**vars(args), "distributed": False}))
    y = val_eval["_labels"].numpy()
    # calibration and thresholds must hold for films exported otherwise too: fit them on the validation
    # films plus copies perturbed as another device would have made them (fixed seed: reproducible)
    copies = [val_eval["_logits"]]
    torch.manual_seed(args.seed + 10_000)
    perturb_eval = AcquisitionPerturb(0.5)
    for _ in range(args.perturbed_copies):
        perturbed = torch.stack([perturb_eval(im) for im in va_img])
        copies.append(_predict_logits(model, norm(perturbed), args))
    temperature, bias = fit_calibration(torch.cat(copies), val_eval["_labels"].repeat(len(copies)))
    per_copy = [operating_points(y, calibrated_probs(c, temperature, bias), args.min_sensitivity) for c in copies]
    # a screening tool is specified by its sensitivity: the default is the most specific threshold that
    # keeps it on every copy, with a margin for estimating it on a finite split (see model.metrics.operating_points)
    points = {k: min(p[k] for p in per_copy) for k in per_copy[0]}
    threshold = points["screening"]
    rule = (f"screening: most specific threshold with validation sensitivity >= {args.min_sensitivity} + 2 SE "
            f"on the validation films and on each of {args.perturbed_copies} perturbed copies")

    meta = ModelMeta(
        architecture=args.arch, input_size=args.image_size, mean=mean, std=std, class_names=list(CLASS_NAMES),
        equalize=args.equalize, spectrum=spectrum, equalize_sigma=args.equalize_sigma if args.equalize else 0.0,
        band_limit=band,
        temperature=temperature, bias=bias, threshold=threshold, operating_points=points,
        name=f"cxr-{args.arch}-{args.image_size}",
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        training={
            "command": commands[0], **({"resumed_with": commands[1:]} if len(commands) > 1 else {}),
            "data": str(args.manifest or args.data_dir), "data_description": args.data_description,
            **({"split_from": str(split_file)} if split_file else {}),
            "train_images": len(tr_y), "val_images": len(va_y),
            "val_patients": len({s.patient for s in val_s}), "skipped_images": len(skipped),
            "epochs_run": epochs_run, "best_epoch": best["epoch"], "best_weights": best["source"],
            "seed": args.seed, "world_size": args.world_size, "device": str(args.device),
            "wall_seconds": round(wall, 1), "default_threshold_rule": rule, "pretrained": args.pretrained,
            **({"initialised_from": {"path": str(args.init_from), "weights_sha256": args.init_from_sha256}}
               if args.init_from else {}),
            "hyperparameters": {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
                                                               "label_smoothing", "ema_decay", "patience", "val_fraction",
                                                               "equalize", "equalize_sigma", "match_spectrum", "band_limit", "perturb_p", "consistency", "consistency_loss",
                                                               "consistency_warmup", "consistency_symmetric", "consistency_tail", "consistency_tail_by",
                                                               "served_consistency", "feature_consistency", "clip_grad_norm",
                                                               "bn_update", "amp")},
        },
    )
    write_split(out / SPLIT_FILE, train_s, val_s, root=args.data_dir)
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    save_artifact(out, model, meta)
    # the input gate is fitted on this run's own films and travels with the weights
    meta.gate = fit_and_store(out, tr_img, tr_y, va_img)
    # the report is produced from the artifact exactly as written, through the app's own loader
    clf = load_model(out, device=str(args.device))
    report = build_report(clf, clf.logits(clf.meta.normalize(va_img)), y, val_s,
                          str(out / SPLIT_FILE), "val", skipped, args.n_boot, root=args.data_dir)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    d = report["metrics"]["default"]
    meta.metrics = {"split": "validation (patient-grouped, from train)", "n": report["data"]["n"],
                    "prevalence": float(y.mean()),  # the class mix the calibration holds for
                    "auc": report["auc"]["value"], "auc_ci95": report["auc"]["ci95"],
                    **{k: d[k] for k in ("threshold", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "brier", "ece")}}
    (out / META_FILE).write_text(meta.to_json())  # weights untouched: the checksum stays valid
    print(format_report(report))
    print(f"artifact written to {out} ({wall / 60:.1f} min of training)")
    if args.distributed:
        dist.destroy_process_group()
    return out


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if not isinstance(v, (int, float, str, bool, type(None))) else v) for k, v in d.items()}


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (DataError, PretrainedWeightsUnavailable, ModelArtifactError) as err:
        sys.exit(f"error: {err}")
