"""Wall time of one k-fold training run per executor: ``--executor local`` (one process, folds one after
another; and ``--jobs J`` child processes) vs ``--executor ray`` (a local Ray started and stopped by the
command, folds as tasks).  Each variant is the real ``kagglecmr train`` command in a fresh process and a
fresh runs folder, so interpreter start-up, Ray start-up and data loading are counted.  Prints a table
and the ratio of each variant to the first.

    python benchmarks/executors.py                        # demo data, demo config, 5 folds x 5 epochs
    python benchmarks/executors.py --epochs 2 --jobs 2 --device cpu --variants jobs,ray,local
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sh(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2, help="--jobs of the parallel local variant (0: leave it out)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default="jobs,ray,local", help="comma list of local, jobs, ray (the first is the reference)")
    args = ap.parse_args()

    k = [sys.executable, "-m", "kagglecmr"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sh([*k, "demo-data", "data"], work)
        sh([*k, "make-folds", "--data", "data", "--n-folds", str(args.folds), "--out", "folds.csv"], work)
        base = [*k, "train", "--fold", f"0..{args.folds - 1}", "--config", args.config, "--data", "data",
                "--folds", "folds.csv", "--epochs", str(args.epochs), "--device", args.device, "--quiet"]
        variants = {"local": ["--executor", "local"], "jobs": ["--executor", "local", "--jobs", str(args.jobs)],
                    "ray": ["--executor", "ray"]}
        rows = []
        for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
            if name == "jobs" and args.jobs < 2:
                continue
            wall = sh([*base, *variants[name], "--runs-dir", f"runs-{name}"], work)
            oof = json.loads((work / f"runs-{name}" / args.config / "oof.json").read_text())["score"]
            label = " ".join(["--executor", "ray" if name == "ray" else "local"]
                             + (["--jobs", str(args.jobs)] if name == "jobs" else []))
            rows.append((label, wall, oof))
    print(f"{args.folds} folds x {args.epochs} epochs, config {args.config}, device {args.device}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'variant':28s} {'wall s':>8s} {'vs first':>9s} {'OOF Dice':>9s}")
    for label, wall, oof in rows:
        print(f"{label:28s} {wall:8.1f} {wall / rows[0][1]:8.2f}x {oof:9.4f}")


if __name__ == "__main__":
    main()
