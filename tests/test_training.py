"""The training and evaluation CLIs on a small subset of the real data (tiny images, few epochs)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, recall_score, roc_auc_score

import model
from training import evaluate as evaluate_cli
from training import train as train_cli
from training.data import (AcquisitionPerturb, DataError, XrayTensorDataset, discover_folder, grouped_split, load_images,
                           patient_id, read_manifest, read_split, train_transform)

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--image-size", "48", "--batch-size", "16", "--max-per-class", "40", "--n-boot", "50", "--quiet",
         "--decode-workers", "2"]


def train(out: Path, data_dir: Path, cache: Path, *extra: str) -> Path:
    args = train_cli.get_args_parser().parse_args(
        ["--data-dir", str(data_dir), "--out", str(out), "--cache-dir", str(cache), *SMALL, *extra])
    return train_cli.main(args)


TWO_EPOCHS = ("--epochs", "2", "--consistency-warmup", "1", "--clip-grad-norm", "1.0", "--equalize-sigma", "2", "--band-limit", "0.35")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, cache):
    """Two epochs, trained once for the whole module (with the from-scratch stabilisers on: consistency ramp, clipping)."""
    return train(tmp_path_factory.mktemp("run") / "a", data_dir, cache, *TWO_EPOCHS)


def read_history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


def comparable(history):
    return [{k: v for k, v in row.items() if "seconds" not in k and "per_s" not in k} for row in history]


# ---- the artifact --------------------------------------------------------------------------------


def test_smoke_run_writes_a_loadable_artifact(trained):
    for name in ("weights.safetensors", "model.json", "report.json", "history.json", "split.csv"):
        assert (trained / name).is_file(), name
    clf = model.load_model(trained)
    meta = clf.meta
    assert meta.architecture == "resnet18" and meta.input_size == 48 and meta.temperature > 0
    assert set(meta.operating_points) == {"youden", "high_sensitivity", "screening"}
    assert meta.threshold == meta.operating_points["screening"]
    assert meta.training["epochs_run"] == 2 and len(read_history(trained)) == 2
    assert meta.training["hyperparameters"]["clip_grad_norm"] == 1.0 and meta.training["hyperparameters"]["consistency_warmup"] == 1.0
    assert {"train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "seconds"} <= set(read_history(trained)[0])
    for row in read_history(trained):  # the invariance term's share is logged apart: it can dominate the loss
        assert 0.0 <= row["train_consistency"] < row["train_loss"]
    assert read_history(trained)[1]["train_consistency"] > 0  # ramped in over epoch 1, at full weight after
    report = json.loads((trained / "report.json").read_text())
    assert report["data"]["n"] == meta.training["val_images"]
    assert meta.metrics["auc"] == report["auc"]["value"]
    assert meta.metrics["prevalence"] == pytest.approx(np.mean([it["y"] for it in report["items"]]))
    # the high-sensitivity point really is what it claims on the split it was chosen on
    assert report["metrics"]["high_sensitivity"]["sensitivity"] >= 0.95
    assert report["metrics"]["default"]["sensitivity"] >= report["metrics"]["high_sensitivity"]["sensitivity"]


def test_retrained_model_carries_a_working_gate(trained, data_dir):
    """The gate is fitted on the run's own training films and stored in the artifact it writes."""
    clf = model.load_model(trained)
    assert clf.has_gate and (trained / "gate.safetensors").is_file()
    assert clf.meta.gate["fitted_on"]["train_images"] == clf.meta.training["train_images"]
    assert clf.meta.gate["val_flag_rate"] <= 0.1
    films = [data_dir / "val" / c / f for c in ("NORMAL", "PNEUMONIA") for f in sorted(os.listdir(data_dir / "val" / c))[:3]]
    scores = [c.score for c in clf.check_inputs(films)]
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    assert clf.check_input(noise).score > np.median(scores)
    assert clf.check_input(np.full((128, 128), 255, np.uint8)).flagged
    assert clf.meta.equalize and clf.meta.training["hyperparameters"]["consistency"] > 0
    assert len(clf.meta.spectrum) == 25 and clf.meta.training["hyperparameters"]["match_spectrum"]
    assert (clf.meta.equalize_sigma, clf.meta.band_limit) == (2.0, 0.35)  # the served input is the trained one


def test_report_scores_reproduce_through_the_public_api(trained, data_dir):
    """The stored validation scores are what load_model().predict_proba gives on those files."""
    clf = model.load_model(trained)
    report = json.loads((trained / "report.json").read_text())
    items = report["items"][:6]
    probs = clf.predict_proba([data_dir / it["file"] for it in items])
    np.testing.assert_allclose(probs, [it["score"] for it in items], atol=1e-5)


def test_same_seed_same_metrics(trained, data_dir, cache, tmp_path):
    again = train(tmp_path / "b", data_dir, cache, *TWO_EPOCHS)
    assert comparable(read_history(again)) == comparable(read_history(trained))


def test_resume_replays_the_uninterrupted_run(trained, data_dir, cache, tmp_path):
    out = tmp_path / "c"
    train(out, data_dir, cache, *TWO_EPOCHS, "--stop-after", "1")  # an interrupted run
    assert len(read_history(out)) == 1
    resumed = train(out, data_dir, cache, *TWO_EPOCHS, "--resume", str(out / "checkpoint.pt"))
    assert comparable(read_history(resumed)) == comparable(read_history(trained))


def test_ddp_two_processes_gloo(data_dir, cache, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training.train",
           "--data-dir", str(data_dir), "--out", str(out), "--cache-dir", str(cache), "--epochs", "1", "--device", "cpu", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    clf = model.load_model(out)
    assert clf.meta.training["world_size"] == 2
    report = json.loads((out / "report.json").read_text())
    # metrics were gathered over the whole validation split, not one rank's half
    assert report["data"]["n"] == clf.meta.training["val_images"]
    assert proc.stdout.count("artifact written") == 1  # only rank 0 writes


def test_fine_tuning_keeps_the_parents_validation_films(trained, data_dir, cache, tmp_path):
    """--init-from reuses the parent's split: a fresh split (another seed here) would train on films the parent
    was validated on, and the child's validation figures would be measured on its own training data."""
    child = train(tmp_path / "child", data_dir, cache, "--epochs", "1", "--seed", "1", "--init-from", str(trained),
                  "--served-consistency", "50")  # the parent's calibration defines the served probability
    val = lambda d: sorted(s.path for s in read_split(d / "split.csv", "val", root=data_dir))  # noqa: E731
    assert val(child) == val(trained)
    training = model.load_model(child).meta.training
    assert training["split_from"] == str(trained / "split.csv") and training["hyperparameters"]["served_consistency"] == 50
    fresh = train(tmp_path / "fresh", data_dir, cache, "--epochs", "1", "--seed", "1", "--init-from", str(trained),
                  "--split-file", "", "--consistency-symmetric", "--consistency-tail", "0.5",  # both views trained
                  "--consistency-tail-by", "served", "--feature-consistency", "5")
    assert val(fresh) != val(trained)
    hyper = model.load_model(fresh).meta.training["hyperparameters"]
    assert hyper["consistency_symmetric"] is True and hyper["consistency_tail"] == 0.5 and hyper["consistency_tail_by"] == "served"
    assert hyper["feature_consistency"] == 5


def test_logit_consistency_is_blind_to_neither_the_boundary_nor_the_scale():
    """Calibration can put the served p = 0.5 where the raw softmax says ~0.06: a log-odds shift there must
    count as it would at p = 0.5 (KL counts it ~4x less). And shrinking every logit, which calibration
    undoes, must not make the loss smaller."""
    import torch

    ref = torch.tensor([[0.0, -2.75], [0.0, 0.0], [0.0, -6.0], [0.0, 5.0]])  # raw P(pneumonia) 0.06, 0.5, ...

    def shifted(row):
        out = ref.clone()
        out[row, 1] += 0.5
        return out

    logit = [float(train_cli.consistency_loss(shifted(r), ref, "logit")) for r in (0, 1)]
    kl = [float(train_cli.consistency_loss(shifted(r), ref, "kl")) for r in (0, 1)]
    assert logit[0] == pytest.approx(logit[1], rel=0.05) and logit[0] > 0
    assert kl[0] < kl[1] / 3
    assert float(train_cli.consistency_loss(ref, ref, "logit")) == 0.0
    answer = ref + torch.tensor([[0.0, 0.3], [0.0, -0.2], [0.0, 0.1], [0.0, -0.4]])
    assert float(train_cli.consistency_loss(answer * 0.5, ref, "logit")) > float(train_cli.consistency_loss(answer, ref, "logit"))


def test_consistency_tail_averages_only_the_worst_films(tmp_path):
    """--consistency-tail 0.25 on 8 films: the mean of the 2 largest squared log-odds changes, over the same
    spread as the full term; 1.0 is the plain mean."""
    import torch

    ref = torch.zeros(8, 2)
    shifts = torch.tensor([0.1, -0.2, 0.0, 1.0, 0.3, -2.0, 0.05, 0.0])
    answer = ref.clone()
    answer[:, 1] += shifts
    spread = float(shifts.var(unbiased=False))
    assert float(train_cli.consistency_loss(answer, ref, "logit", 0.25)) == pytest.approx((4.0 + 1.0) / 2 / spread)
    assert float(train_cli.consistency_loss(answer, ref, "logit")) == pytest.approx(float(shifts.pow(2).mean()) / spread)
    with pytest.raises(train_cli.DataError, match="--consistency-tail must be"):  # a fraction outside (0, 1]
        train_cli.main(train_cli.get_args_parser().parse_args(["--out", str(tmp_path / "x"), "--consistency-tail", "0"]))
    with pytest.raises(train_cli.DataError, match="needs --consistency-loss logit"):  # KL has no per-film tail
        train_cli.main(train_cli.get_args_parser().parse_args(["--out", str(tmp_path / "x"), "--consistency-tail", "0.5",
                                                                "--consistency-loss", "kl"]))


def test_consistency_tail_by_served_keeps_the_films_near_the_boundary(tmp_path):
    """Ranked by the served probability's change, the tail keeps a modest log-odds change at the served
    boundary over a larger one on a confident film, whose shown probability does not move."""
    import torch

    t, b = 0.8, 4.4  # served p = 0.5 at raw margin -3.52
    ref = torch.tensor([[0.0, -3.52], [0.0, 9.0], [0.0, -12.0], [0.0, 6.0]])
    answer = ref.clone()
    answer[:, 1] += torch.tensor([0.3, 2.0, 0.0, 0.1])
    moved = train_cli.served_change(answer, ref, t, b)
    assert int(moved.argmax()) == 0 and float(moved[1]) < 0.01 < float(moved[0])
    spread = float((answer[:, 1] - answer[:, 0]).var(unbiased=False))
    by_served = float(train_cli.consistency_loss(answer, ref, "logit", 0.25, rank=moved))
    by_logit = float(train_cli.consistency_loss(answer, ref, "logit", 0.25))
    assert by_served == pytest.approx(0.3 ** 2 / spread, rel=1e-5) and by_logit == pytest.approx(2.0 ** 2 / spread, rel=1e-5)
    with pytest.raises(train_cli.DataError, match="needs --init-from"):
        train_cli.main(train_cli.get_args_parser().parse_args(["--out", str(tmp_path / "x"), "--consistency-tail", "0.25",
                                                                "--consistency-tail-by", "served"]))


@pytest.mark.parametrize("symmetric", [False, True])
def test_symmetric_consistency_trains_the_films_own_view(symmetric):
    """One step on (film, perturbed copy) pairs: by default the film's output is a fixed reference, so swapping
    in another film leaves the update unchanged when the copies and the consistency term are the same;
    --consistency-symmetric trains the film's view too, so the update follows the film."""
    import torch

    flags = ["--out", "x", "--consistency", "0", "--quiet"] + (["--consistency-symmetric"] if symmetric else [])
    args = train_cli.get_args_parser().parse_args(flags)
    args.device, args.amp, args.channels_last, args.world_size, args.rank, args.distributed = (
        torch.device("cpu"), False, False, 1, 0, False)
    gen = torch.Generator().manual_seed(0)
    copies, other_films = torch.randn(8, 1, 1, 4, 4, generator=gen), torch.randn(2, 8, 1, 1, 4, 4, generator=gen)
    target = torch.tensor([0, 1] * 4)

    def updated(films):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        train_cli.train_one_epoch(net, torch.nn.CrossEntropyLoss(), opt, sched, [(torch.cat([films, copies], 1), target)],
                                  args, 0)
        return net[1].weight.detach().clone()

    a, b = updated(other_films[0]), updated(other_films[1])
    assert torch.equal(a, b) != symmetric


def test_feature_consistency_measures_the_heads_input_without_scale():
    """The term reads the classifier head's input (a ResNet's 512 pooled features), is 0 when they hold still,
    and does not change when every feature is scaled (so shrinking the features cannot meet it)."""
    import torch

    from model.registry import create_model, get_spec

    net = create_model("resnet18", num_classes=2, in_chans=1).eval()
    tap = train_cli.FeatureTap(net.get_submodule(get_spec("resnet18").classifier))
    x = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = net(x)
        features = tap.pop()
    assert features.shape == (4, 512) and tap.features is None
    assert torch.allclose(net.fc(features), logits, atol=1e-5)
    moved = features.clone()
    moved[0] += 0.1 * features.std()
    loss = float(train_cli.feature_consistency_loss(moved, features))
    assert float(train_cli.feature_consistency_loss(features, features)) == 0.0 < loss
    assert float(train_cli.feature_consistency_loss(3 * moved, 3 * features)) == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_feature_consistency_changes_the_update(symmetric):
    """One SGD step with the term on differs from one without it, with the film's view fixed or trained."""
    import torch

    gen = torch.Generator().manual_seed(0)
    batch = [(torch.randn(8, 2, 1, 4, 4, generator=gen), torch.tensor([0, 1] * 4))]

    def updated(weight):
        flags = ["--out", "x", "--consistency", "1", "--feature-consistency", str(weight), "--quiet"]
        args = train_cli.get_args_parser().parse_args(flags + (["--consistency-symmetric"] if symmetric else []))
        args.device, args.amp, args.channels_last, args.world_size, args.rank, args.distributed = (
            torch.device("cpu"), False, False, 1, 0, False)
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        tap = train_cli.FeatureTap(net[3]) if weight else None
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        train_cli.train_one_epoch(net, torch.nn.CrossEntropyLoss(), opt, sched, batch, args, 0, tap=tap)
        return net[1].weight.detach().clone()

    assert not torch.allclose(updated(0), updated(10))


def test_feature_consistency_needs_the_consistency_pair(tmp_path):
    for flags in (["--feature-consistency", "-1"], ["--feature-consistency", "5", "--consistency", "0"]):
        with pytest.raises(train_cli.DataError, match="--feature-consistency"):
            train_cli.main(train_cli.get_args_parser().parse_args(["--out", str(tmp_path / "x")] + flags))


def test_consistency_weight_ramps_from_zero_only_when_asked():
    """From scratch the invariance term ramps in over --consistency-warmup epochs; fine-tuning starts at full weight."""
    args = train_cli.get_args_parser().parse_args(["--out", "x", "--consistency", "40", "--consistency-warmup", "2"])
    steps = 100
    ramp = [train_cli.consistency_weight(args, e, s, steps) for e in range(4) for s in range(0, steps, 25)]
    assert ramp[0] == 0.0 and all(b >= a for a, b in zip(ramp, ramp[1:]))  # starts at 0, never falls
    assert train_cli.consistency_weight(args, 1, 0, steps) == 20.0  # halfway through the ramp: half the weight
    assert train_cli.consistency_weight(args, 2, 0, steps) == 40.0 == max(ramp)  # full weight from then on
    fine_tune = train_cli.get_args_parser().parse_args(["--out", "x", "--consistency", "40"])
    assert train_cli.consistency_weight(fine_tune, 0, 0, steps) == 40.0


def test_served_consistency_pulls_where_the_served_probability_moves():
    """The same log-odds shift costs most where the calibrated p is near 0.5 and almost nothing on a confident
    film; the loss is the squared change of exactly the probability the app shows."""
    import torch

    from model.classifier import calibrated_probs

    t, b = 0.8, 4.4  # a class-weighted model's calibration: served p = 0.5 at raw margin -3.52
    ref = torch.tensor([[0.0, -3.52], [0.0, 8.0], [0.0, -12.0]])

    def shifted(row):
        out = ref.clone()
        out[row, 1] += 0.5
        return out

    costs = [float(train_cli.served_consistency_loss(shifted(r), ref, t, b)) for r in range(3)]
    assert costs[0] > 100 * max(costs[1], costs[2]) > 0
    dp = calibrated_probs(shifted(0), t, b, as_numpy=False) - calibrated_probs(ref, t, b, as_numpy=False)
    assert costs[0] == pytest.approx(float(dp.pow(2).mean()))
    assert float(train_cli.served_consistency_loss(ref, ref, t, b)) == 0.0


def test_served_consistency_needs_a_parent_calibration(tmp_path, data_dir, cache):
    with pytest.raises(train_cli.DataError, match="--init-from"):
        train(tmp_path / "x", data_dir, cache, "--epochs", "1", "--served-consistency", "50")


@pytest.mark.parametrize("flags", [("--equalize-sigma", "-1"), ("--equalize-sigma", "40"), ("--band-limit", "-0.1"), ("--band-limit", "9")])
def test_preprocessing_flags_out_of_range_fail_before_training(tmp_path, data_dir, cache, flags):
    """Refused up front, not after an hour of training by the artifact loader."""
    with pytest.raises(train_cli.DataError, match="--equalize-sigma must be"):
        train(tmp_path / "x", data_dir, cache, "--epochs", "1", *flags)
    assert not (tmp_path / "x").exists()

def test_zero_epochs_refinalises_the_parents_weights_under_new_preprocessing(trained, data_dir, cache, tmp_path):
    """--epochs 0 --init-from: the same weights (checksum), this run's preprocessing in the metadata, a fresh
    calibration, gate and report that the public API reproduces, and the parent's training history."""
    with pytest.raises(DataError, match="--init-from"):
        train(tmp_path / "bad", data_dir, cache, "--epochs", "0")
    out = train(tmp_path / "z", data_dir, cache, "--epochs", "0", "--init-from", str(trained),
                "--equalize-sigma", "0", "--band-limit", "0")
    parent, child = model.load_model(trained), model.load_model(out)
    assert child.meta.weights_sha256 == parent.meta.weights_sha256
    assert (child.meta.equalize_sigma, child.meta.band_limit) == (0.0, None) != (parent.meta.equalize_sigma, parent.meta.band_limit)
    assert child.meta.training["epochs_run"] == 0 and child.meta.training["best_weights"] == "init_from"
    assert read_history(out) == read_history(trained)
    assert child.has_gate and child.meta.temperature != parent.meta.temperature
    items = json.loads((out / "report.json").read_text())["items"][:6]
    np.testing.assert_allclose(child.predict_proba([data_dir / it["file"] for it in items]), [it["score"] for it in items], atol=1e-5)


def test_init_from_another_architecture_only_where_the_weights_fit(trained, data_dir, cache, tmp_path):
    """A resnet18 starts a resnet18_aa (the low-pass has no parameters); an efficientnet cannot take its weights,
    and is told so before anything is written."""
    out = train(tmp_path / "aa", data_dir, cache, "--epochs", "0", "--arch", "resnet18_aa", "--init-from", str(trained))
    parent, child = model.load_model(trained), model.load_model(out)
    assert (parent.meta.architecture, child.meta.architecture) == ("resnet18", "resnet18_aa")
    assert child.meta.weights_sha256 == parent.meta.weights_sha256
    items = json.loads((out / "report.json").read_text())["items"][:6]
    films = [data_dir / it["file"] for it in items]
    np.testing.assert_allclose(child.predict_proba(films), [it["score"] for it in items], atol=1e-5)
    assert not np.allclose(child.predict_proba(films), parent.predict_proba(films), atol=1e-4)  # the blur acts
    with pytest.raises(DataError, match="do not fit --arch efficientnet_b0"):
        train(tmp_path / "eff", data_dir, cache, "--epochs", "0", "--arch", "efficientnet_b0", "--init-from", str(trained))
    assert not (tmp_path / "eff").exists()


def test_bn_update_re_estimates_only_the_batchnorm_statistics(trained, data_dir, cache, tmp_path):
    """--bn-update under new preprocessing: every learned parameter is the parent's; the running statistics are
    re-measured over one augmented pass of the training films (checked against that pass done by hand),
    reproducibly; and the report holds for the served model."""
    import torch

    flags = ("--epochs", "0", "--init-from", str(trained), "--equalize-sigma", "0", "--band-limit", "0", "--bn-update")
    out = train(tmp_path / "bn", data_dir, cache, *flags)
    (net_p, parent), (net_c, child) = model.load_artifact(trained), model.load_artifact(out)  # unfolded networks
    assert child.training["hyperparameters"]["bn_update"] and not parent.training["hyperparameters"]["bn_update"]
    p_params = dict(net_p.named_parameters())
    assert all(torch.equal(p_params[k], v) for k, v in net_c.named_parameters())
    assert child.weights_sha256 != parent.weights_sha256
    # the same pass by hand: the training films in order, under the training augmentation, with the run's seed;
    # each batch's mean of the first convolution's output, averaged over batches with equal weight
    imgs, labels, _, _ = load_images(read_split(out / "split.csv", "train", root=data_dir), 48, str(cache), 2, False)
    torch.manual_seed(20_000)
    stream = torch.utils.data.DataLoader(XrayTensorDataset(imgs, labels, child.normalize, train_transform(48),
                                                           AcquisitionPerturb(0.35)), 16, shuffle=False)
    with torch.inference_mode():
        expected = torch.stack([net_c.conv1(x).mean((0, 2, 3)) for x, _ in stream]).mean(0)
    torch.testing.assert_close(net_c.bn1.running_mean, expected, atol=1e-5, rtol=1e-4)
    assert (net_p.bn1.running_mean - expected).abs().max() > 1e-3  # the parent's statistics were not these
    assert model.read_meta(train(tmp_path / "bn2", data_dir, cache, *flags)).weights_sha256 == child.weights_sha256
    items = json.loads((out / "report.json").read_text())["items"][:6]
    np.testing.assert_allclose(model.load_model(out).predict_proba([data_dir / it["file"] for it in items]),
                               [it["score"] for it in items], atol=1e-5)


@pytest.mark.parametrize("sigma", [0.8, 1.5, 2.5])
def test_training_blur_is_a_whole_gaussian(sigma):
    """The blur behind training's softness and unsharp-mask perturbations has the width it is asked for
    (a truncated kernel silently trained on narrower filters than the ones it is measured against)."""
    import torch

    from training.data import gaussian_blur

    impulse = torch.zeros(1, 1, 65, 65)
    impulse[..., 32, 32] = 1.0
    out = gaussian_blur(impulse, sigma)[0, 0].double()
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-4)
    r2 = (torch.arange(65, dtype=torch.float64) - 32) ** 2
    assert float((out.sum(0) * r2).sum().sqrt()) == pytest.approx(sigma, rel=0.03)


@pytest.mark.parametrize("kernel", range(3))
def test_training_resamplers_soften_like_a_device(kernel):
    """Each down-sampling kernel a softer device is simulated with removes detail finer than its pixels
    (no aliasing back) and keeps the film's mean brightness."""
    import torch
    import torch.nn.functional as F

    from training.data import RESAMPLERS

    fine = (torch.arange(64).view(1, -1) + torch.arange(64).view(-1, 1)) % 2 * 200.0 + 20.0
    x = fine.view(1, 1, 64, 64)
    y = F.interpolate(F.interpolate(x, (32, 32), **RESAMPLERS[kernel]), (64, 64), mode="bilinear", align_corners=False)
    assert float(y.std()) < 0.1 * float(x.std())
    assert float(y.mean()) == pytest.approx(float(x.mean()), rel=0.02)


# ---- the split -----------------------------------------------------------------------------------


def test_patient_ids_from_kaggle_names():
    assert patient_id("person1000_bacteria_2931.jpeg") == "person1000"
    assert patient_id("person1000_virus_1681.jpeg") == "person1000"
    assert patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_id("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert patient_id("scan.png") == "scan"


def test_split_keeps_patients_apart_and_is_reproducible(data_dir):
    samples = discover_folder(data_dir, "train")
    tr, va = grouped_split(samples, 0.2, seed=0)
    assert not {s.patient for s in tr} & {s.patient for s in va}
    assert len(tr) + len(va) == len(samples)
    assert 0.15 < len(va) / len(samples) < 0.25
    rate = lambda xs: np.mean([s.label for s in xs])  # noqa: E731
    assert abs(rate(tr) - rate(va)) < 0.03  # stratified
    tr2, va2 = grouped_split(samples, 0.2, seed=0)
    assert [s.path for s in va2] == [s.path for s in va]
    _, va3 = grouped_split(samples, 0.2, seed=1)
    assert [s.path for s in va3] != [s.path for s in va]


def test_split_file_round_trip(trained, data_dir):
    val = read_split(trained / "split.csv", "val", root=data_dir)
    train_ = read_split(trained / "split.csv", "train", root=data_dir)
    assert not {s.patient for s in val} & {s.patient for s in train_}
    assert all(Path(s.path).is_file() for s in val)


# ---- evaluate ------------------------------------------------------------------------------------


def test_evaluate_cli_metrics_equal_sklearn(trained, data_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = evaluate_cli.get_args_parser().parse_args(
        ["--model", str(trained), "--data-dir", str(data_dir), "--split", "val", "--out", str(out), "--n-boot", "100"])
    evaluate_cli.main(args)
    printed = capsys.readouterr().out
    assert "AUC" in printed and "sens" in printed and "default" in printed
    report = json.loads(out.read_text())
    y = np.array([it["y"] for it in report["items"]])
    s = np.array([it["score"] for it in report["items"]])
    assert len(y) == 16  # the official val folder
    assert report["auc"]["value"] == pytest.approx(roc_auc_score(y, s))
    t = report["threshold"]
    m = report["metrics"]["default"]
    tn, fp, fn, tp = confusion_matrix(y, (s >= t).astype(int), labels=[0, 1]).ravel()
    assert m["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert m["sensitivity"] == pytest.approx(recall_score(y, s >= t))
    # scores are the public API's scores
    clf = model.load_model(trained)
    np.testing.assert_allclose(clf.predict_proba([data_dir / f for f in [it["file"] for it in report["items"][:4]]]),
                               s[:4], atol=1e-5)


def test_manifest_csv(tmp_path, real_images):
    rows = [(p, "NORMAL") for p in real_images["NORMAL"]] + [(p, "pneumonia") for p in real_images["PNEUMONIA"]]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    samples = read_manifest(tmp_path / "m.csv")
    assert [s.label for s in samples] == [0] * 4 + [1] * 4


# ---- bad data ------------------------------------------------------------------------------------


def _folder(tmp_path, real_images, normal=2, pneumonia=2, extra=None):
    root = tmp_path / "ds"
    for cls, n in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for p in real_images[cls][:n]:
            (root / "train" / cls / p.name).symlink_to(p)
    if extra:
        extra(root)
    return root


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        discover_folder(tmp_path / "nothing", "train")


def test_empty_folder(tmp_path, real_images):
    root = _folder(tmp_path, real_images, 0, 0)
    with pytest.raises(DataError, match="No images"):
        discover_folder(root, "train")


def test_single_class(tmp_path, real_images):
    root = _folder(tmp_path, real_images, 0, 3)
    with pytest.raises(DataError, match="only PNEUMONIA"):
        discover_folder(root, "train")


def test_unknown_label_folder(tmp_path, real_images):
    root = _folder(tmp_path, real_images, extra=lambda r: (r / "train" / "COVID").mkdir())
    with pytest.raises(DataError, match="Unknown label 'COVID'"):
        discover_folder(root, "train")


def test_bad_manifest_label(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\nx.png,maybe\n")
    with pytest.raises(DataError, match="m.csv:2: Unknown label 'maybe'"):
        read_manifest(tmp_path / "m.csv")


def test_unreadable_images_are_skipped_and_counted(tmp_path, real_images):
    def corrupt(root):
        (root / "train" / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff garbage")
    root = _folder(tmp_path, real_images, extra=corrupt)
    samples = discover_folder(root, "train")
    images, labels, kept, skipped = load_images(samples, 48, None, progress=False)
    assert len(kept) == 4 and len(skipped) == 1 and "broken.jpeg" in skipped[0]
    assert images.shape == (4, 1, 48, 48)


def test_cli_reports_bad_data_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "error: Data folder not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("module, default", [("train", "(default: 32)"), ("evaluate", "(default: 1000)")])
def test_cli_help_shows_defaults(module, default):
    import importlib

    help_text = importlib.import_module(f"training.{module}").get_args_parser().format_help()
    assert default in help_text and "(default: None)" in help_text


def test_recipe_stages_chain_and_resume(tmp_path):
    """training.recipe: each stage starts from the one before (same split), extra flags reach every stage,
    and an interrupted stage resumes from its checkpoint instead of starting over."""
    from training import recipe

    args = recipe.get_args_parser().parse_args(["--data-dir", "D", "--out", str(tmp_path), "--split-file", "S.csv",
                                                "--epochs-scale", "0.5"])
    (tmp_path / "3-spectrum").mkdir()
    (tmp_path / "3-spectrum" / train_cli.CHECKPOINT_FILE).write_bytes(b"")
    lines = recipe.stage_args(args, ["--quiet"])
    assert len(lines) == len(recipe.STAGES) == 5
    assert "--split-file" in lines[0] and "--init-from" not in lines[0]
    for prev, line in zip(recipe.STAGES, lines[1:]):
        assert line[line.index("--init-from") + 1] == str(tmp_path / prev[0]) and "--split-file" not in line
    assert [line[line.index("--epochs") + 1] for line in lines] == ["8", "2", "2", "2", "0"]  # 16, 4, 5, 3 halved (>= 1); 0 stays
    assert all(line[-1] == "--quiet" for line in lines)
    assert [("--resume" in line) for line in lines] == [False, False, True, False, False]
    for line in lines:  # every stage's command line is one training.train accepts
        train_cli.get_args_parser().parse_args(line)


def test_recipe_runs_end_to_end(tmp_path, data_dir, cache):
    from training import recipe

    args = recipe.get_args_parser().parse_args(["--data-dir", str(data_dir), "--out", str(tmp_path / "r"),
                                                "--epochs-scale", "0.01"])
    out = recipe.main(args, [*SMALL, "--cache-dir", str(cache)])
    clf = model.load_model(out)
    stages = [json.loads((out / name / "model.json").read_text())["training"] for name, _ in recipe.STAGES]
    assert clf.meta.weights_sha256 == json.loads((out / recipe.STAGES[-1][0] / "model.json").read_text())["weights_sha256"]
    assert [s.get("initialised_from", {}).get("path") for s in stages] == [None] + [str(out / n) for n, _ in recipe.STAGES[:-1]]
    assert not stages[0]["hyperparameters"]["equalize"] and stages[-2]["hyperparameters"]["consistency"] == 40
    assert clf.meta.weights_sha256 == json.loads((out / recipe.STAGES[-2][0] / "model.json").read_text())["weights_sha256"]
    assert stages[-1]["epochs_run"] == 0 and (clf.meta.equalize_sigma, clf.meta.band_limit) == (2.0, 0.35)
    assert set(json.loads((out / "recipe.json").read_text())["training_wall_seconds"]) == {n for n, _ in recipe.STAGES}
    again = recipe.main(args, [*SMALL, "--cache-dir", str(cache)])  # finished stages are skipped: nothing retrains
    assert model.load_model(again).meta.weights_sha256 == clf.meta.weights_sha256
