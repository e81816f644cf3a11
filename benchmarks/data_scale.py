"""Memory at Kaggle scale (issue 24): a generated competition the size of Severstal steel (12,000 RGB images of
256x1600 with 4 defect classes, ~15 GB decoded), and the peak resident memory of each step run as a user runs
it, each in its own process:

* ``cache``: the decoded-array cache built (``load_dataset(...).labelled()``): wall time, images/s;
* ``make-folds``: ``kagglecmr make-folds`` (similarity guard, stratification);
* ``train``: ``kagglecmr train --config demo --set data.patch=[256,256] --set train.max_steps=300 --fold 0``
  (one epoch capped at 300 steps, then validation and the out-of-fold files of the 2,400 held-out images
  by 256x256 tiles): steps/s of the 300 steps;
* ``predict``: ``kagglecmr predict`` of 100 of the images (tiled, as the run was trained on patches).

Peak RSS is the ``ru_maxrss`` of each child process (``os.wait4``; shared libraries and file pages it maps
count).  Images are flat-shaded bands and shapes, so the PNGs stay small on disk (about 20 KB each); the cache
takes ~20 GB (images + masks).  Everything generated lives in one folder (``--work``, default a temporary
folder on the disk of the current directory) and is deleted at the end unless ``--keep``.

    python benchmarks/data_scale.py                 # the full 12,000 images (hours on 2 CPU cores)
    python benchmarks/data_scale.py --n 500         # a quick check
    python benchmarks/data_scale.py --val 480       # fold 0 validated on 480 of its 2,400 images (CPU hours)
    python benchmarks/data_scale.py --n 500 --keep --work /tmp/scale   # keep the data to look at
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

H, W, CLASSES = 256, 1600, 5  # background + 4 defect classes, as Severstal
LIMIT_GB = 3.0
SHADE = np.array([0, 60, -50, 80, -70], np.int16)  # grey level change of each defect class
TINT = [(np.arange(256) * f).astype(np.uint8) for f in (1.0, 0.97, 0.92)]  # per-channel lookup tables


def _image(k: int) -> tuple[np.ndarray, np.ndarray]:
    """One steel-like strip (flat grey bands, a few darker streaks) and its mask of 0..4 defect shapes."""
    rng = np.random.default_rng(k)
    edges = np.sort(rng.integers(0, H, size=int(rng.integers(3, 9))))  # flat bands of random heights
    band = rng.integers(90, 170, size=len(edges) + 1)[np.searchsorted(edges, np.arange(H))]
    img = np.repeat(band.astype(np.int16)[:, None], W, axis=1)
    for _ in range(int(rng.integers(2, 6))):  # streaks across the strip
        x = int(rng.integers(0, W - 40))
        img[:, x:x + int(rng.integers(4, 40))] -= int(rng.integers(10, 40))
    mask = np.zeros((H, W), np.uint8)
    for _ in range(int(rng.integers(0, 4))):  # 0..3 defects, none in about a quarter of the images
        c = int(rng.integers(1, CLASSES))
        cx, cy = int(rng.integers(0, W)), int(rng.integers(0, H))
        ax, ay = int(rng.integers(10, 120)), int(rng.integers(5, 60))
        if rng.random() < 0.5:
            cv2.ellipse(mask, (cx, cy), (ax, ay), float(rng.integers(0, 180)), 0, 360, c, -1)
        else:
            cv2.rectangle(mask, (cx - ax, cy - ay), (cx + ax, cy + ay), c, -1)
    img += SHADE[mask]
    grey = np.clip(img, 0, 255, out=img).astype(np.uint8)
    rgb = cv2.merge([grey, cv2.LUT(grey, TINT[1]), cv2.LUT(grey, TINT[2])])  # a little colour: channels differ
    return rgb, mask


def _write(args) -> int:
    k, root = args
    rgb, mask = _image(k)
    ok = cv2.imwrite(str(root / "train" / "image" / f"s{k}.png"), rgb[:, :, ::-1])
    ok &= cv2.imwrite(str(root / "train" / "mask" / f"s{k}_mask.png"), mask)
    if not ok:
        raise OSError(f"{root}: cannot write PNGs")
    return k


def generate(root: Path, n: int, workers: int) -> float:
    for sub in ("image", "mask"):
        (root / "train" / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with Pool(workers) as pool:
        for done, _ in enumerate(pool.imap_unordered(_write, [(k, root) for k in range(n)], chunksize=16), 1):
            if done % 1000 == 0:
                print(f"generated {done}/{n}", flush=True)
    return time.perf_counter() - t0


def _folder_gb(folder: Path) -> float:
    try:
        return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e9
    except OSError:  # a file went away while counting
        return 0.0


def run(name: str, cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run ``cmd``; its wall time and peak RSS (GB), its output appended to ``log``."""
    print(f"[{name}] {' '.join(map(str, cmd))}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n==== {name}: {' '.join(map(str, cmd))}\n")
        fh.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        sys.exit(f"[{name}] failed (exit {proc.returncode}):\n{tail}")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9
    print(f"[{name}] {wall:.1f} s, peak RSS {rss:.2f} GB", flush=True)
    return {"step": name, "wall_s": wall, "rss_gb": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12000, help="training images (default 12000, Severstal's size)")
    ap.add_argument("--steps", type=int, default=300, help="train.max_steps")
    ap.add_argument("--val", type=int, default=0, help="validate fold 0 on this many of its images (0: all, a fifth "
                    "of --n; validation memory goes by blocks, its time by images)")
    ap.add_argument("--predict", type=int, default=100, help="images given to predict")
    ap.add_argument("--workers", type=int, default=2, help="processes generating the images")
    ap.add_argument("--work", type=Path, default=None, help="folder for everything generated (default: temporary)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data, cache and run")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="kagglecmr-scale-", dir=Path.cwd()))
    work.mkdir(parents=True, exist_ok=True)
    data, log = work / "data", work / "log.txt"
    env = os.environ | {"KAGGLECMR_CACHE": str(work / "cache"), "NO_ALBUMENTATIONS_UPDATE": "1"}
    k = [sys.executable, "-m", "kagglecmr"]
    rows, disk_peak, stop = [], [0.0], threading.Event()

    def watch_disk():  # the most the work folder held, sampled
        while not stop.wait(20):
            disk_peak[0] = max(disk_peak[0], _folder_gb(work))

    threading.Thread(target=watch_disk, daemon=True).start()
    try:
        if len(list(data.glob("train/*/*.png"))) == 2 * args.n:  # --work of an earlier --keep run
            print(f"reusing the {args.n} images of {data}", flush=True)
        else:
            gen_s = generate(data, args.n, args.workers)
            disk = sum(f.stat().st_size for f in data.rglob("*.png")) / 1e9
            print(f"generated {args.n} images + masks in {gen_s:.0f} s ({disk:.2f} GB of PNG)", flush=True)

        build = run("cache", [sys.executable, "-c", "import sys; from kagglecmr.data.dataset import load_dataset; "
                              "load_dataset(sys.argv[1]).labelled()", data], work, env, log)
        rates = re.findall(r"cache: decoded (\d+)/(\d+) images \((\d+)/s", log.read_text())
        build["note"] = f"{rates[-1][2]} images/s decoding" if rates else ""
        rows.append(build)

        rows.append(run("make-folds", [*k, "make-folds", "--data", data, "--out", work / "folds.csv"], work, env, log))

        folds = work / "folds.csv"
        if args.val:  # fold 0 cut to about --val held-out images (whole groups), the rest of it moved to fold 1
            folds = work / f"folds-val{args.val}.csv"
            df = pd.read_csv(work / "folds.csv")
            zero = df[df["fold"] == 0].groupby("group", sort=False).size()
            keep = zero.index[np.cumsum(zero.to_numpy()) - zero.to_numpy() < args.val]
            df.loc[(df["fold"] == 0) & ~df["group"].isin(keep), "fold"] = 1
            df.to_csv(folds, index=False)
        train = run("train", [*k, "train", "--config", "demo", "--data", data, "--folds", folds,
                              "--fold", "0", "--name", "scale", "--runs-dir", work / "runs", "--device", args.device,
                              "--set", "data.patch=[256,256]", "--set", f"train.max_steps={args.steps}", "--quiet"],
                    work, env, log)
        fold = work / "runs" / "scale" / "fold0"
        with open(fold / "metrics.csv") as fh:
            epochs = list(csv.DictReader(fh))
        env_json = json.loads((fold / "env.json").read_text())
        per_epoch = max(1, env_json["train_images"] // 16)
        steps = min(args.steps, per_epoch * len(epochs))
        data_s, model_s = (sum(float(m[c]) for m in epochs) for c in ("data_s", "model_s"))
        oof_gb = sum(f.stat().st_size for f in fold.glob("oof*.npz")) / 1e9
        train["note"] = (f"{steps} steps at {steps / (data_s + model_s):.2f} steps/s (data {data_s:.0f} s, model "
                         f"{model_s:.0f} s); validation of {env_json['val_images']} images by tiles "
                         f"{float(epochs[-1]['val_s']):.0f} s; OOF files {oof_gb:.1f} GB")
        rows.append(train)

        picks = work / "predict-in"
        picks.mkdir()
        for f in sorted((data / "train" / "image").iterdir())[:args.predict]:
            os.link(f, picks / f.name)
        pred = run("predict", [*k, "predict", picks, "--out", work / "predict-out", "--runs", work / "runs" / "scale",
                               "--device", args.device], work, env, log)
        pred["note"] = f"{args.predict} images, tiled"
        rows.append(pred)
    finally:
        stop.set()
        cache_gb = _folder_gb(work / "cache")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    decoded = args.n * H * W * 3 / 1e9
    print(f"\n{args.n} RGB images {W}x{H} ({decoded:.1f} GB decoded; cache {cache_gb:.1f} GB on disk, work folder "
          f"at most {disk_peak[0]:.1f} GB), device {args.device}, {os.cpu_count()} CPU cores; limit {LIMIT_GB} GB "
          f"per process\n")
    print("| step | wall | peak RSS | within limit | notes |")
    print("|---|---|---|---|---|")
    for r in rows:
        ok = "yes" if r["rss_gb"] <= LIMIT_GB else "**no**"
        print(f"| {r['step']} | {r['wall_s']:.0f} s | {r['rss_gb']:.2f} GB | {ok} | {r.get('note', '')} |")
    print(json.dumps(rows))
    if not args.keep:
        print(f"deleted {work}")


if __name__ == "__main__":
    main()
