"""What one warm-up per process saves (issue 15): ``kagglecmr train --fold 0..K-1`` in one process with
the kept step state (default) vs ``KAGGLECMR_WARM=0`` (model, optimiser and, on a GPU, the CUDA graph of
the training step built again for every fold).  Each variant is the real command in a fresh process
and runs folder.  Prints per fold the set-up seconds (``env.json`` ``setup_s``: model build + state),
the first epoch's seconds (includes the CUDA-graph capture on a GPU) and the later epochs' mean, then
the wall time of each variant and whether the two runs' metrics agree (they must on a CPU).

    python benchmarks/warm_start.py                                   # demo data, demo config, CPU
    python benchmarks/warm_start.py --device cuda --config default --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME_COLUMNS = {"time_s", "data_s", "model_s", "val_s"}


def sh(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall


def fold_rows(run: Path, k: int) -> tuple[dict, list[dict]]:
    env = json.loads((run / f"fold{k}" / "env.json").read_text())
    with open(run / f"fold{k}" / "metrics.csv", newline="") as fh:
        return env, list(csv.DictReader(fh))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    k = [sys.executable, "-m", "kagglecmr"]
    base_env = os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sh([*k, "demo-data", "data"], work, base_env)
        sh([*k, "make-folds", "--data", "data", "--n-folds", str(args.folds), "--out", "folds.csv"], work, base_env)
        cmd = [*k, "train", "--fold", f"0..{args.folds - 1}", "--config", args.config, "--data", "data",
               "--folds", "folds.csv", "--epochs", str(args.epochs), "--device", args.device, "--quiet"]
        walls, runs = {}, {}
        for name, warm in (("warm", "1"), ("cold", "0")):
            walls[name] = sh([*cmd, "--runs-dir", f"runs-{name}"], work, base_env | {"KAGGLECMR_WARM": warm})
            runs[name] = work / f"runs-{name}" / args.config
        print(f"{args.folds} folds x {args.epochs} epochs, config {args.config}, device {args.device}, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        print(f"{'fold':>4s} | {'warm: reused':>12s} {'setup s':>8s} {'epoch1 s':>9s} {'later s':>8s} | "
              f"{'cold: setup s':>13s} {'epoch1 s':>9s} {'later s':>8s} | same metrics")
        same_all = True
        for f in range(args.folds):
            (ew, mw), (ec, mc) = fold_rows(runs["warm"], f), fold_rows(runs["cold"], f)
            same = ([{c: v for c, v in r.items() if c not in TIME_COLUMNS} for r in mw]
                    == [{c: v for c, v in r.items() if c not in TIME_COLUMNS} for r in mc])
            same_all &= same
            print(f"{f:4d} | {str(ew['warm_start']):>12s} {ew['setup_s']:8.2f} {float(mw[0]['time_s']):9.2f} "
                  f"{_later_epochs_s(mw):8.2f} | {ec['setup_s']:13.2f} {float(mc[0]['time_s']):9.2f} "
                  f"{_later_epochs_s(mc):8.2f} | {same}")
        print(f"wall: warm {walls['warm']:.1f} s, cold {walls['cold']:.1f} s ({walls['cold'] - walls['warm']:+.1f} s "
              f"cold - warm); metrics identical in every fold: {same_all}")


def _later_epochs_s(rows: list[dict]) -> float:
    """Mean seconds of the epochs after the first (metrics.csv rows)."""
    return sum(float(r["time_s"]) for r in rows[1:]) / max(1, len(rows) - 1)


if __name__ == "__main__":
    main()
