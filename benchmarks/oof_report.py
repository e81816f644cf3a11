"""Where the out-of-fold Dice is lost: per fold, per class, the worst image×class rows with the size
of the true structure, Dice by heart-size tercile, and what the learning curves say.

    python benchmarks/oof_report.py --run runs/bench/default --data ../shared/data/cmr
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from kagglecmr.data.dataset import load_dataset
from kagglecmr.engine.rundir import read_oof_labels
from kagglecmr.formats.metric import dice_table

CLASSES = {1: "RV", 2: "Myo", 3: "LV"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cmr"))
    ap.add_argument("--worst", type=int, default=12)
    args = ap.parse_args()
    data = load_dataset(args.data).labelled()
    files = sorted(args.run.glob("fold*/oof.npz"))
    ids, preds = read_oof_labels(files)
    folds = [f.parent.name for f, p in zip(files, preds) for _ in range(len(p))]
    pred = np.concatenate(preds)
    truth = data.subset(ids).masks
    table = dice_table(pred, truth, 4)
    area = np.stack([(truth == k).sum((1, 2)) for k in (1, 2, 3)], 1)
    pred_area = np.stack([(pred == k).sum((1, 2)) for k in (1, 2, 3)], 1)
    rows = pd.DataFrame({"id": np.repeat(ids, 3), "fold": np.repeat(folds, 3),
                         "class": np.tile([CLASSES[k] for k in (1, 2, 3)], len(ids)),
                         "dice": table.ravel(), "true_px": area.ravel(), "pred_px": pred_area.ravel()})
    print(f"OOF Dice {table.mean():.4f} over {table.size} rows; per class: " +
          ", ".join(f"{CLASSES[k]} {table[:, k - 1].mean():.4f}" for k in (1, 2, 3)))
    print("\nper fold:\n" + rows.groupby("fold")["dice"].mean().round(4).to_string())
    heart = area[:, 1] + area[:, 2]
    tercile = pd.qcut(heart, 3, labels=["small (apical)", "middle", "large (basal)"])
    by_size = pd.DataFrame(table, columns=list(CLASSES.values())).groupby(tercile, observed=True).mean()
    print("\nDice by heart size (LV+Myo area tercile):\n" + by_size.round(4).to_string())
    lost = (1 - rows["dice"]).groupby(rows["class"]).sum() / len(rows)
    print("\nshare of the missing Dice (1 - OOF) by class:\n" + (lost / lost.sum()).round(3).to_string())
    print(f"\nworst {args.worst} rows:\n" + rows.nsmallest(args.worst, "dice").round(4).to_string(index=False))
    summaries = [json.loads(p.read_text()) for p in sorted(args.run.glob("fold*/summary.json"))]
    curves = [pd.read_csv(p) for p in sorted(args.run.glob("fold*/metrics.csv"))]
    print("\nlearning curves: best epoch per fold", [s["best_epoch"] for s in summaries],
          "| last-epoch train loss", [round(float(c["train_loss"].iloc[-1]), 3) for c in curves],
          "| val Dice at best vs last", [(round(float(c["val_dice"].max()), 3), round(float(c["val_dice"].iloc[-1]), 3))
                                          for c in curves])


if __name__ == "__main__":
    main()
