"""Inference speed of an ensemble: N fold models × TTA passes over the test images, on one device.

Models are built from a config with random weights (speed does not depend on the weights); the images
are the test split of --data (or 80 generated ones).  Prints a table of seconds per precision.

    python benchmarks/ensemble_speed.py --config default --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kagglecmr.cfg.config import load_config  # noqa: E402
from kagglecmr.data.dataset import apply_dataset, load_dataset  # noqa: E402
from kagglecmr.engine.ensembler import Run, predict_images  # noqa: E402
from kagglecmr.models.factory import build_model  # noqa: E402
from kagglecmr.utils.runtime import resolve_device, setup_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="default")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cmr"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    setup_threads(0)
    dev = resolve_device(args.device)
    if not (args.data / "test" / "image").is_dir():
        from kagglecmr.data.demo import make_demo_dataset

        args.data = Path(tempfile.mkdtemp()) / "demo"
        make_demo_dataset(args.data, n_train=1, n_val=0, n_test=80)
    ds = load_dataset(args.data)
    results = {}
    print("| precision | models | TTA passes | images | seconds | images×passes×models / s |")
    print("|---|---|---|---|---|---|")
    for amp in ("none", "bf16"):
        cfg = apply_dataset(load_config(args.config, [*args.set, f"train.amp={amp}", "model.weights=none"]), ds)
        images = ds.load("test", labelled=False).images
        models = {k: build_model(cfg, check_size=False).to(dev).to(memory_format=torch.channels_last).eval()
                  for k in range(args.folds)}
        run = Run("bench", Path("."), cfg, models)
        passes = list(cfg.infer.tta)
        bs = cfg.infer.batch_size_for(dev.type)
        predict_images([run], images[:8], dev, passes, np.ones(1), bs)  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            predict_images([run], images, dev, passes, np.ones(1), bs)
            times.append(time.perf_counter() - t)
        best = min(times)
        results[amp] = best
        work = len(images) * len(passes) * args.folds
        print(f"| {amp} | {args.folds} | {len(passes)} | {len(images)} | {best:.2f} | {work / best:.0f} |")
    print(json.dumps({"device": str(dev), "config": args.config, "seconds": {k: round(v, 3) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
