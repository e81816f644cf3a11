"""Training throughput, side by side on one machine:

(a) a plain reference loop: PyTorch DataLoader over the PNG files, per-sample albumentations, the same
    model and loss, float32, contiguous memory;
(b) kagglecmr's trainer (``train_fold``: in-memory uint8 arrays, the configured augmentation backend,
    bf16 autocast, channels_last), measured from its own per-epoch timings.

Prints a table, then as the last line one JSON object per device:
``{"device", "reference_img_s", "kagglecmr_img_s", "outside_model_share", ...}``.

    python benchmarks/speed.py --device cpu
    python benchmarks/speed.py --device cuda --config offline --data ../shared/data/cmr
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from kagglecmr.cfg.config import load_config  # noqa: E402
from kagglecmr.data.augment import build_albumentations  # noqa: E402
from kagglecmr.data.dataset import apply_dataset, load_dataset, prepare  # noqa: E402
from kagglecmr.data.loader import discover  # noqa: E402
from kagglecmr.engine.trainer import train_fold  # noqa: E402
from kagglecmr.models.factory import build_model  # noqa: E402
from kagglecmr.models.losses import build_loss  # noqa: E402
from kagglecmr.utils.runtime import cpu_count, resolve_device, setup_threads  # noqa: E402


class PngDataset(torch.utils.data.Dataset):
    """What typical competition code does: read and augment one sample per __getitem__."""

    def __init__(self, items, aug_cfg):
        self.items, self.aug = items, build_albumentations(aug_cfg)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        _, ip, mp = self.items[i]
        img = cv2.imread(str(ip), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(mp), cv2.IMREAD_GRAYSCALE)
        r = self.aug(image=img, mask=mask)
        return torch.from_numpy(r["image"]).float().div(255)[None], torch.from_numpy(r["mask"]).long()


def reference(cfg, data_root: Path, device: torch.device, steps: int, workers: int) -> dict:
    items = [it for split in ("train", "val") if (data_root / split / "image").is_dir()
             for it in discover(data_root, split)]
    loader = torch.utils.data.DataLoader(PngDataset(items, cfg.augment), batch_size=cfg.train.batch_size,
                                         shuffle=True, drop_last=True, num_workers=workers,
                                         persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    model = build_model(cfg, weights="none").to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    crit = build_loss(cfg.loss, cfg.data.num_classes).to(device)
    done, outside, inside, warm = 0, 0.0, 0.0, 3
    t_start = None
    while done < steps + warm:
        it = iter(loader)
        while done < steps + warm:
            ta = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            tb = time.perf_counter()
            loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
            tc = time.perf_counter()
            done += 1
            if done == warm:
                t_start = time.perf_counter()
            elif done > warm:
                outside += tb - ta
                inside += tc - tb
    total = time.perf_counter() - t_start
    return {"img_s": steps * cfg.train.batch_size / total, "outside_share": outside / (outside + inside),
            "step_ms": 1000 * total / steps}


def kagglecmr_trainer(cfg, data_root: Path, device: torch.device, epochs: int) -> dict:
    data = prepare(cfg, data_root, quiet=True)[2]
    folds = pd.DataFrame({"id": data.ids, "fold": np.arange(len(data)) % 5})
    cfg = cfg.model_copy(deep=True)
    cfg.train.epochs = epochs
    cfg.model.weights = "none"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speed" / "fold0"
        train_fold(cfg, data, folds, 0, out, device=device, quiet=True)
        all_epochs = pd.read_csv(out / "metrics.csv")
        m = all_epochs.iloc[1:]  # first epoch: warm-up (kernel selection, allocator)
    n_train = int((folds["fold"] != 0).sum())
    steps = n_train // min(cfg.train.batch_size, n_train)
    imgs = steps * min(cfg.train.batch_size, n_train)
    return {"img_s": imgs * len(m) / (m["data_s"] + m["model_s"]).sum(),
            "epoch_img_s": imgs * len(m) / m["time_s"].sum(),
            "outside_share": float(m["data_s"].sum() / (m["data_s"] + m["model_s"]).sum()),
            "epoch_s": float(m["time_s"].mean()), "val_s": float(m["val_s"].mean()),
            "first_epoch_s": float(all_epochs["time_s"].iloc[0]),
            "step_ms": 1000 * float((m["data_s"] + m["model_s"]).sum()) / (steps * len(m))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--config", default="default")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cmr"))
    ap.add_argument("--steps", type=int, default=30, help="reference steps to time")
    ap.add_argument("--epochs", type=int, default=6, help="kagglecmr epochs to time (first is warm-up)")
    ap.add_argument("--workers", type=int, default=min(4, cpu_count()))
    args = ap.parse_args()
    if not args.data.is_dir():
        from kagglecmr.data.demo import make_demo_dataset

        args.data = Path(tempfile.mkdtemp()) / "demo"
        make_demo_dataset(args.data, n_train=80, n_val=20, n_test=0)
    setup_threads(0)
    dev = resolve_device(args.device)
    cfg = apply_dataset(load_config(args.config, args.set), load_dataset(args.data))  # data keys from the dataset
    ref = reference(cfg, args.data, dev, args.steps, args.workers)
    ours = kagglecmr_trainer(cfg, args.data, dev, args.epochs)
    print(f"device {dev} | {cfg.model.arch}/{cfg.model.encoder} input {cfg.data.size}px x{cfg.model.input_scale or 1} | "
          f"batch {cfg.train.batch_size} | amp {cfg.train.amp} | threads {torch.get_num_threads()}")
    print("| loop | train img/s | step ms | outside fwd/bwd | epoch s (incl. val+ckpt) | first epoch s |")
    print("|---|---|---|---|---|---|")
    print(f"| reference (DataLoader x{args.workers} + albumentations, fp32) | {ref['img_s']:.1f} | "
          f"{ref['step_ms']:.1f} | {100 * ref['outside_share']:.1f}% | - | - |")
    print(f"| kagglecmr | {ours['img_s']:.1f} | {ours['step_ms']:.1f} | {100 * ours['outside_share']:.1f}% | "
          f"{ours['epoch_s']:.2f} (val {ours['val_s']:.2f}) | {ours['first_epoch_s']:.1f} |")
    print(json.dumps({"device": str(dev), "reference_img_s": round(ref["img_s"], 2),
                      "kagglecmr_img_s": round(ours["img_s"], 2),
                      "kagglecmr_epoch_img_s": round(ours["epoch_img_s"], 2),
                      "outside_model_share": round(ours["outside_share"], 4),
                      "first_epoch_s": round(ours["first_epoch_s"], 2),
                      "reference_outside_model_share": round(ref["outside_share"], 4),
                      "speedup": round(ours["img_s"] / ref["img_s"], 2)}))


if __name__ == "__main__":
    main()
