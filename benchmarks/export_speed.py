"""Export an ensemble to ONNX and compare it with ``ensemble`` on a split: parity and CPU latency.

    python benchmarks/export_speed.py --runs runs/default --data ../shared/data/cmr --tta-flips none,hflip \
        --out /tmp/default.onnx [--split test] [--threads 2] [--repeats 3]

Prints the export's parity check (float32 ensemble vs onnxruntime on the labelled images), then the
wall time to predict every image of ``--split`` with ``kc.load_ensemble(...).predict_proba`` (what
``ensemble`` runs, with the config's autocast) and with onnxruntime (batches of the config's CPU batch
size), the median of ``--repeats`` after one warm-up, and the largest difference between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tta-flips", default="none,hflip")
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch and onnxruntime (0: all)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    import kagglecmr as kc
    from kagglecmr.data.dataset import apply_dataset, load_dataset

    flips = args.tta_flips.split(",")
    res = kc.export(args.runs, out=args.out, format="onnx", tta_flips=flips, data=args.data, force=True)
    model = kc.load_ensemble(args.runs, tta_flips=flips, device="cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = model.runs[0].cfg
    ds = load_dataset(args.data)
    apply_dataset(cfg, ds)  # the run's size (and resize) on the dataset
    images = ds.load(args.split, labelled=False).images  # [N, H, W, C]
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))

    opts = ort.SessionOptions()
    if args.threads:
        opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(args.out), opts, providers=["CPUExecutionProvider"])
    bs = cfg.infer.cpu_batch_size

    def run_ort():
        return np.concatenate([sess.run(["probs"], {"image": nchw[i:i + bs]})[0] for i in range(0, len(nchw), bs)])

    t_ens = _median_time(lambda: model.predict_proba(images[..., 0] if images.shape[-1] == 1 else images), args.repeats)
    t_ort = _median_time(run_ort, args.repeats)
    p_ens = model.predict_proba(images[..., 0] if images.shape[-1] == 1 else images)
    p_ort = run_ort()
    print(json.dumps({
        "images": len(images), "models": model.n_models, "tta": flips, "threads": torch.get_num_threads(),
        "amp": cfg.train.amp, "parity_fp32_max_abs": res.max_error, "parity_checked_on": res.checked_on,
        "ensemble_s": round(t_ens, 3), "onnxruntime_s": round(t_ort, 3),
        "max_abs_ort_vs_ensemble_as_run": float(np.abs(p_ort - p_ens).max()),
        "argmax_agreement": float((p_ort.argmax(1) == p_ens.argmax(1)).mean()),
        "file_mb": round(args.out.stat().st_size / 1e6, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
