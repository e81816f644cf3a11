"""Empty-mask gating on the sparse demo (issue 25, item 4): about half the slices without a heart.

Trains the recipe twice on the same folds, without and with the image-level head (``model.cls_head``), then
on each run's OOF probabilities (flip TTA) tunes the component rules and the gates (``triplet``, ``head``,
``triplet,head``) exactly as ``ensemble --gate`` does, and prints each run's per-class table: OOF before
(after the component rules), after (optimistic: chosen on that OOF) and nested (honest), with the seconds.

    python benchmarks/gating.py                       # demo recipe, 15 epochs, 5 folds, CPU
    python benchmarks/gating.py --epochs 30 --device cuda
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kagglecmr.data.dataset import load_dataset
from kagglecmr.engine.ensembler import load_run, predict_oof, tta_passes
from kagglecmr.engine.gate_runs import report
from kagglecmr.engine.gating import gate_stats, tune_gates
from kagglecmr.engine.postprocess import apply_plan, tune_plan
from kagglecmr.engine.presence import runs_presence_oof
from kagglecmr.formats.competition_metric import Metric
from kagglecmr.utils.runtime import resolve_device


def sh(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          env=os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1"})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", type=Path, default=None, help="Work in this folder (kept) instead of a temporary one.")
    args = ap.parse_args()

    k = [sys.executable, "-m", "kagglecmr"]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "data").is_dir():
            sh([*k, "demo-data", "data", "--kind", "sparse"], work)
            sh([*k, "make-folds", "--data", "data", "--n-folds", str(args.folds), "--out", "folds.csv"], work)
        ds = load_dataset(work / "data")
        labelled = ds.labelled()
        empty = (labelled.masks.reshape(len(labelled), -1).max(1) == 0).mean()
        print(f"sparse demo: {len(labelled)} labelled images, {empty:.0%} empty; {args.config} recipe, "
              f"{args.epochs} epochs, {args.folds} folds, device {args.device}", flush=True)
        dev = resolve_device(args.device)
        metric = Metric()
        for name, head in (("plain", "false"), ("head", "true")):
            wall = sh([*k, "train", "--fold", f"0..{args.folds - 1}", "--config", args.config, "--data", "data",
                       "--folds", "folds.csv", "--epochs", str(args.epochs), "--device", args.device, "--quiet",
                       "--name", name, "--set", f"model.cls_head={head}"], work)
            run = load_run(work / "runs" / name, dev)
            passes = tta_passes([run], True, None)
            t0 = time.perf_counter()
            probs = predict_oof([run], labelled, dev, passes, np.ones(1), 32)
            presence = runs_presence_oof([run], labelled, dev, passes, np.ones(1), 32) if head == "true" else None
            t_pred = time.perf_counter() - t0
            pred = probs.argmax(1).astype(np.uint8)
            plan, *_ = tune_plan(pred, labelled.masks, ds.num_classes)
            pp = apply_plan(pred, plan, ds.num_classes)
            table = metric.table_labels(pp, labelled.masks, ds.num_classes)
            raw = metric.table_labels(pred, labelled.masks, ds.num_classes).score
            fold_of = {i: f for f, held in run.holdout.items() for i in held}
            groups = np.array([fold_of[i] for i in labelled.ids])
            print(f"\n== {name}: training {wall / 60:.1f} min; OOF {raw:.4f} raw, {table.score:.4f} after the "
                  f"component rules; OOF prediction {t_pred:.1f} s", flush=True)
            for kinds in (("triplet",), ("head",), ("triplet", "head")):
                if "head" in kinds and presence is None:
                    continue
                t0 = time.perf_counter()
                stats = gate_stats(probs, range(1, ds.num_classes), presence=presence)
                res = tune_gates(table, stats, kinds=kinds, groups=groups)
                print(report(res, kinds, ds.classes) + f"  [{time.perf_counter() - t0:.2f} s]", flush=True)


if __name__ == "__main__":
    main()
