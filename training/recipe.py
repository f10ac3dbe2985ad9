"""The shipped model's recipe in one command: four training stages, each fine-tuning the one before, and a
re-finalisation of the last one's weights under the canonicalising preprocessing.

    uv run python -m training.recipe --data-dir ../shared/data/chest_xray --out runs/v8 [--split-file S]

Why stages, not one run: from random weights, the log-odds consistency term at the weight that makes the
model invariant (40) drowns the classification loss before there is anything to keep invariant (two
single-run attempts in docs/recipes.md); learning the task first and then the invariance works. The fifth
step trains nothing (``--epochs 0``): it reads the equalisation mapping from a smoothed copy and band-limits
the input, then calibrates, chooses the operating points and fits the gate anew (fine-tuning under that
preprocessing was measured and made the sharpening tail worse, docs/recipes.md). Each stage is a plain
``training.train`` run into ``OUT/<stage>``; the last stage's artifact is copied to ``OUT``.
Interrupted? Run the same command again: finished stages are skipped and an unfinished one resumes from
its checkpoint. Extra arguments after ``--`` go to every stage (e.g. ``-- --max-per-class 40 --quiet``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from model.artifact import HISTORY_FILE, META_FILE, REPORT_FILE, SPLIT_FILE, WEIGHTS_FILE
from model.gate import GATE_FILE

from . import train

# (stage, its flags); every stage after the first starts from the previous one (--init-from, same split)
STAGES: list[tuple[str, list[str]]] = [
    ("1-task", ["--epochs", "16", "--lr", "2e-3", "--warmup-epochs", "1", "--ema-decay", "0.998",
                "--no-equalize", "--no-match-spectrum", "--perturb-p", "0", "--consistency", "0"]),
    ("2-equalised", ["--epochs", "4", "--lr", "1e-3", "--warmup-epochs", "0.3", "--ema-decay", "0.995", "--patience", "10",
                     "--no-match-spectrum", "--perturb-p", "0.35", "--consistency", "5", "--consistency-loss", "kl"]),
    ("3-spectrum", ["--epochs", "5", "--lr", "5e-4", "--warmup-epochs", "0.3", "--ema-decay", "0.995", "--patience", "10",
                    "--perturb-p", "0.4", "--consistency", "20", "--consistency-loss", "logit"]),
    ("4-invariance", ["--epochs", "3", "--lr", "3e-4", "--warmup-epochs", "0.3", "--ema-decay", "0.995", "--patience", "10",
                      "--perturb-p", "0.4", "--consistency", "40", "--consistency-loss", "logit"]),
    ("5-canonical", ["--epochs", "0", "--equalize-sigma", "2", "--band-limit", "0.35"]),
]
ARTIFACT_FILES = (WEIGHTS_FILE, GATE_FILE, META_FILE, REPORT_FILE, HISTORY_FILE, SPLIT_FILE)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="Kaggle layout root (<root>/train/{NORMAL,PNEUMONIA})")
    p.add_argument("--out", required=True, help="directory for the stages and the final artifact")
    p.add_argument("--split-file", default=None, help="a split.csv to reuse (default: a fresh patient-grouped split)")
    p.add_argument("--data-description", default="", help="one sentence on the training data, for the model card")
    p.add_argument("--epochs-scale", default=1.0, type=float, help="multiply every stage's epochs (smoke runs)")
    return p


def stage_args(args, extra: list[str]) -> list[list[str]]:
    """Every stage's full training.train command line."""
    out, lines = Path(args.out), []
    for i, (name, flags) in enumerate(STAGES):
        flags = list(flags)
        k = flags.index("--epochs") + 1
        if int(flags[k]) > 0:  # 0 (re-finalise only) stays 0
            flags[k] = str(max(1, round(int(flags[k]) * args.epochs_scale)))
        line = ["--data-dir", args.data_dir, "--out", str(out / name), *flags]
        if i == 0:
            line += ["--split-file", args.split_file] if args.split_file else []
        else:
            line += ["--init-from", str(out / STAGES[i - 1][0])]  # reuses that stage's split
        if args.data_description:
            line += ["--data-description", args.data_description]
        checkpoint = out / name / train.CHECKPOINT_FILE
        if checkpoint.is_file() and not (out / name / META_FILE).is_file():
            line += ["--resume", str(checkpoint)]
        lines.append(line + extra)
    return lines


def main(args, extra: list[str]) -> Path:
    out = Path(args.out)
    t0 = time.perf_counter()
    for (name, _), line in zip(STAGES, stage_args(args, extra)):
        if (out / name / META_FILE).is_file():
            print(f"stage {name}: done, skipped")
            continue
        print(f"stage {name}: python -m training.train {' '.join(line)}", flush=True)
        train.main(train.get_args_parser().parse_args(line))
    last = out / STAGES[-1][0]
    for f in ARTIFACT_FILES:
        if (last / f).is_file():
            shutil.copy2(last / f, out / f)
    walls = {name: json.loads((out / name / META_FILE).read_text())["training"]["wall_seconds"] for name, _ in STAGES}
    (out / "recipe.json").write_text(json.dumps({"stages": [{"stage": n, "flags": f} for n, f in STAGES],
                                                 "training_wall_seconds": walls,
                                                 "this_invocation_seconds": round(time.perf_counter() - t0, 1)}, indent=1) + "\n")
    print(f"recipe done: {out} (training {sum(walls.values()) / 60:.1f} min over {len(STAGES)} stages)")
    return out


if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    main(get_args_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv), extra)
