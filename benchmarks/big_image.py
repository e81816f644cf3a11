"""Peak memory of ``kagglecmr predict`` on one 12-Mpx photo (3000x4000 RGB JPEG) with a tiny tiled run.

Generates 4 phantoms (the demo's, upscaled to 3000x4000 RGB PNGs with their masks), trains fold 0 of 2 for a
few patch steps (``data.patch: 256``, so prediction uses 256-px tiles at half overlap) and measures with
``/usr/bin/time -v`` the peak resident memory (max RSS) of:

* ``load``: a Python process that imports kagglecmr and loads the run's model (``kc.load_ensemble``): the
  baseline, what "the model" costs;
* ``predict``: ``kagglecmr predict photo.jpg --runs RUN --out OUT --device cpu`` (and with ``--tta``);

and prints them with the difference from the baseline.  Everything is written under ``--work`` (a temporary
folder by default) and deleted afterwards unless ``--keep``.

    python benchmarks/big_image.py
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from kagglecmr.data.demo import make_demo_dataset  # noqa: E402
from kagglecmr.data.folds import run_make_folds  # noqa: E402

H, W = 3000, 4000
CONFIG = """\
seed: 7
model:
  arch: Unet
  encoder: resnet18
  weights: none
  params: {encoder_depth: 3, decoder_channels: [16, 8, 4]}
loss: {name: dice_ce}
data: {patch: 256}
train: {epochs: 1, batch_size: 4, max_steps: 4, warmup_epochs: 0, amp: none, lr: 0.003}
infer: {tta: [none, hflip, vflip, hvflip]}
"""


def colour(grey: np.ndarray) -> np.ndarray:
    """A BGR picture of a grey phantom whose three channels differ (so the run keeps RGB)."""
    g = grey.astype(np.float32)
    return np.dstack([g, 0.7 * g + 40, 255 - 0.5 * g]).clip(0, 255).astype(np.uint8)


def make_data(root: Path) -> Path:
    demo = root / "demo"
    make_demo_dataset(demo, n_train=4, n_val=0, n_test=1, seed=11, size=300)
    data = root / "big"
    for split in ("train", "test"):
        for p in sorted((demo / split / "image").glob("*.png")):
            img = cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (W, H), interpolation=cv2.INTER_LINEAR)
            (data / split / "image").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(data / split / "image" / p.name), colour(img))
            m = demo / split / "mask" / f"{p.stem}_mask.png"
            if m.is_file():
                (data / split / "mask").mkdir(parents=True, exist_ok=True)
                mask = cv2.resize(cv2.imread(str(m), cv2.IMREAD_UNCHANGED), (W, H), interpolation=cv2.INTER_NEAREST)
                cv2.imwrite(str(data / split / "mask" / m.name), mask)
    shutil.rmtree(demo)
    return data


def timed(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(max RSS in MB, wall seconds, stdout) of ``cmd`` under ``/usr/bin/time -v``."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return int(rss.group(1)) / 1024, wall, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and run")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kc-bigimg-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env_cache = ["--cache-dir", "off"]
    rows = []
    try:
        if not (work / "runs" / "big" / "fold0" / "summary.json").is_file():  # (a --keep'd folder: measure again)
            data = make_data(work)
            cv2.imwrite(str(work / "photo.jpg"), cv2.imread(str(next((data / "test" / "image").glob("*.png")))),
                        [cv2.IMWRITE_JPEG_QUALITY, 90])
            run_make_folds(data, n_folds=2, seed=0, out=work / "folds.csv")
            (work / "big.yaml").write_text(CONFIG)
            rss, wall, _ = timed([py, "-m", "kagglecmr", *env_cache, "train", "--fold", "0", "--config", "big.yaml",
                                  "--data", str(data), "--folds", "folds.csv", "--runs-dir", "runs", "--name", "big",
                                  "--device", "cpu", "--quiet"], work)
            rows.append(("train fold 0 (4 steps + tiled validation of 2 images)", rss, wall))
        load = ("import kagglecmr as kc; p = kc.load_ensemble('runs/big', device='cpu'); "
                "print(p.n_models, p.size, p.runs[0].cfg.tile)")
        base, wall, out = timed([py, "-c", load], work)
        rows.insert(0, (f"load the run (baseline: {out.strip()})", base, wall))
        for extra in ([], ["--tta"]):
            rss, wall, _ = timed([py, "-m", "kagglecmr", *env_cache, "predict", "photo.jpg", "--runs", "runs/big",
                                  "--out", f"pred{len(extra)}", "--device", "cpu", "--force", *extra], work)
            rows.append((f"predict photo.jpg ({W}x{H} RGB){' --tta' if extra else ''}", rss, wall))
        mask = cv2.imread(str(work / "pred0" / "photo.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (H, W), mask.shape
        print("\n| step | peak RSS MB | minus baseline MB | wall s |\n|---|---|---|---|")
        for name, rss, wall in rows:
            print(f"| {name} | {rss:.0f} | {rss - base:+.0f} | {wall:.1f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
