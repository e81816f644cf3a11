"""Per-fold training: ``kagglecmr train --fold 0..4``.

One fold reads top to bottom in :func:`train_fold`: data in memory, model, optimiser, schedule,
resume from ``last.pt``, the epoch loop (augment, forward/backward, validate with the leaderboard
metric, keep ``best`` and ``last``), then out-of-fold probabilities from ``best``.

The fold folder's files are listed in :mod:`kagglecmr.runs`; run orchestration (several folds, ``--jobs``,
the OOF summary) lives there too.

Every epoch re-seeds from ``(seed, fold, epoch)``, so resuming after a crash (even kill -9) replays
exactly what an uninterrupted run would have done: on the CPU the metrics are identical.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .averaging import EMA
from .batches import BatchMaker
from .checkpoint import load_best, load_last, save_best, save_last
from .config import Config
from .cudagraph import GraphedStep, use_cuda_graphs
from .data import Split
from .infer import predict_proba, to_tensor
from .io import atomic_path, atomic_write_json
from .losses import build_loss
from .models import build_model, count_parameters
from .optim import build_optimizer, lr_lambda
from .progress import Reporter, write_metrics
from .runs import FULL, FoldResult, prepare_dir
from .runtime import amp_dtype, autocast, environment, peak_memory_mb, seed_everything
from .score import dice_table
from .tracking import Tracker

FULL_SEED_SLOT = 1_000_000  # stands in for the fold number when seeding the full fit (seeds must be >= 0)
TIME_COLUMNS = ("time_s", "data_s", "model_s", "val_s")


def train_fold(cfg: Config, data: Split, folds_df, fold, out_dir: Path, *, device: torch.device,
               force: bool = False, quiet: bool = False, dataset: dict | None = None) -> FoldResult:
    t_start = time.time()
    if prepare_dir(out_dir, cfg, force):
        summary = json.loads((out_dir / "summary.json").read_text())
        best = "" if summary["best_score"] is None else f"best {summary['best_score']:.4f} at "
        print(f"{out_dir}: already finished ({best}epoch {summary['best_epoch']}); --force retrains it", flush=True)
        best_score = float("nan") if summary["best_score"] is None else summary["best_score"]
        return FoldResult(fold, out_dir, best_score, summary["best_epoch"], skipped=True)
    if dataset is not None:  # what the fold was trained on (Dataset.describe())
        atomic_write_json(out_dir / "dataset.json", dataset)

    # ---- data: the fold's images as uint8 arrays in memory
    if fold == FULL:
        train_ids, val_ids = list(data.ids), []
    else:
        in_val = folds_df.set_index("id").loc[data.ids, "fold"].to_numpy() == fold
        train_ids = [i for i, v in zip(data.ids, in_val) if not v]
        val_ids = [i for i, v in zip(data.ids, in_val) if v]
    tr, va = data.subset(train_ids), data.subset(val_ids) if val_ids else None
    bs = min(cfg.train.batch_size, len(tr))
    steps_per_epoch = max(1, len(tr) // bs)  # drop the ragged last batch (BatchNorm on tiny batches)
    k_fg = cfg.data.num_classes - 1

    # ---- model, optimiser, schedule, loss
    fold_num = FULL_SEED_SLOT if fold == FULL else int(fold)
    seed_everything(cfg.seed, fold_num)
    model = build_model(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(cfg.train.amp, device)
    graphs = use_cuda_graphs(cfg, device, dtype)
    optimizer = build_optimizer(cfg, model, capturable=graphs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16 and device.type == "cuda"))
    criterion = build_loss(cfg.loss, cfg.data.num_classes).to(device)
    ema = EMA(model, cfg.train.ema) if cfg.train.ema > 0 else None
    forward = torch.compile(model) if cfg.train.compile else model

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a batch (gradients must be cleared before); returns the loss."""
        with autocast(device, dtype):
            logits = forward(x)
        loss = criterion(logits, y)
        scaler.scale(loss).backward()
        if cfg.train.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model)
        return loss.detach()

    def state_tensors() -> list[torch.Tensor]:
        """Everything a training step changes, in a stable order (for CUDA-graph warm-up undo)."""
        out = list(model.state_dict(keep_vars=True).values())
        out += list(ema.model.state_dict(keep_vars=True).values()) if ema is not None else []
        out += [v for p in model.parameters() for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        return out

    graphed = None
    batches = BatchMaker(cfg, tr.images, tr.masks, device)
    x_val = to_tensor(va.images, device, cfg.train.channels_last) if va else None
    y_val = torch.from_numpy(va.masks).to(device).long() if va else None

    # ---- resume
    history, start_epoch, best_score, best_epoch = [], 0, -1.0, 0
    last_path, best_path = out_dir / "last.pt", out_dir / "best.safetensors"
    if last_path.is_file():
        state = load_last(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.model.load_state_dict(state["ema"])
        if graphs:  # the learning rate must stay a tensor on the GPU for the captured optimiser
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        history, start_epoch = state["history"], state["epoch"]
        best_score, best_epoch = state["best_score"], state["best_epoch"]
        print(f"{out_dir}: resuming after epoch {start_epoch}", flush=True)
    env = environment(device) | {"parameters": count_parameters(model), "train_images": len(tr),
                                 "val_images": len(val_ids), "augment_backend": batches.backend,
                                 "cuda_graphs": graphs,
                                 "amp": str(dtype).replace("torch.", "") if dtype else "float32"}
    atomic_write_json(out_dir / "env.json", env)

    # ---- epochs
    tracker = Tracker(out_dir, cfg.train.log, start_epoch)
    reporter = Reporter(f"{out_dir.parent.name}/{out_dir.name}", cfg.train.epochs, quiet)
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.time()
            epoch_seed = seed_everything(cfg.seed, fold_num, epoch)
            batches.reseed(epoch_seed)
            perm = np.random.default_rng(epoch_seed).permutation(len(tr))
            model.train()
            data_s = model_s = loss_sum = 0.0
            for step in range(steps_per_epoch):
                ta = time.perf_counter()
                x, y = batches(perm[step * bs:(step + 1) * bs])
                tb = time.perf_counter()
                if graphs and graphed is None:
                    graphed = GraphedStep.capture(train_step, state_tensors, x, y, optimizer)
                    graphs = graphed is not None
                if graphed is not None:
                    loss = graphed(x, y)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss = train_step(x, y)
                scheduler.step()
                loss_sum += loss.item()  # also synchronises, so model_s is honest on a GPU
                data_s += tb - ta
                model_s += time.perf_counter() - tb
                reporter.step(epoch, loss_sum / (step + 1))

            # validate with the leaderboard metric (argmax masks, rows per image and class, empty/empty = 1)
            tv = time.time()
            row = {"epoch": epoch + 1, "lr": float(optimizer.param_groups[0]["lr"]), "train_loss": loss_sum / steps_per_epoch,
                   "val_loss": float("nan"), "val_dice": float("nan")}
            row |= {f"dice_{k}": float("nan") for k in range(1, k_fg + 1)}
            eval_model = ema.model if ema is not None else model
            if va is not None:
                probs, vloss = _validate(eval_model, criterion, x_val, y_val, device, dtype, cfg.train.val_batch_size)
                table = dice_table(probs.argmax(1), va.masks, cfg.data.num_classes)
                row |= {"val_loss": vloss, "val_dice": float(table.mean())}
                row |= {f"dice_{k}": float(table[:, k - 1].mean()) for k in range(1, k_fg + 1)}
                improved = row["val_dice"] > best_score
            else:
                improved = True  # full fit: the last epoch is the model
            if improved:
                best_score = row["val_dice"] if va is not None else float("nan")
                best_epoch = epoch + 1
                save_best(best_path, eval_model, cfg, best_epoch, best_score, dataset)
            row["best"] = bool(improved)
            row |= {"time_s": time.time() - t0, "data_s": data_s, "model_s": model_s, "val_s": time.time() - tv}
            history.append(row)
            save_last(last_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.model.state_dict() if ema is not None else None,
                "epoch": epoch + 1, "history": history, "best_score": float(best_score), "best_epoch": best_epoch,
                "rng_torch": torch.get_rng_state(),
            })
            write_metrics(out_dir / "metrics.csv", history)
            tracker.epoch(row)
            reporter.epoch(row)
    finally:
        tracker.close()
        reporter.close()
    _plot(out_dir, history)

    # ---- out-of-fold probabilities from the best checkpoint
    if va is not None:
        sd, _ = load_best(best_path)
        model.load_state_dict(sd)
        probs = predict_proba(model, x_val, device, batch_size=cfg.train.val_batch_size, amp=dtype)
        labels = probs.argmax(1).astype(np.uint8)  # from float32: float16 rounding can flip near-ties
        table = dice_table(labels, va.masks, cfg.data.num_classes)
        with atomic_path(out_dir / "oof.npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, ids=np.array(va.ids), probs=probs.astype(np.float16), labels=labels, dice=table)
    epochs_run = [r for r in history if r["epoch"] > start_epoch]
    summary = {
        "fold": fold, "best_score": None if math.isnan(best_score) else best_score, "best_epoch": best_epoch,
        "epochs": cfg.train.epochs, "train_images": len(tr), "val_images": len(val_ids),
        "seconds": time.time() - t_start,
        "seconds_per_epoch": float(np.mean([r["time_s"] for r in epochs_run])) if epochs_run else None,
        "data_seconds_per_epoch": float(np.mean([r["data_s"] for r in epochs_run])) if epochs_run else None,
        "model_seconds_per_epoch": float(np.mean([r["model_s"] for r in epochs_run])) if epochs_run else None,
        "peak_memory_mb": peak_memory_mb(device),
    }
    atomic_write_json(out_dir / "env.json", env | {k: summary[k] for k in
                                                   ("seconds_per_epoch", "peak_memory_mb", "seconds")})
    atomic_write_json(out_dir / "summary.json", summary)
    return FoldResult(fold, out_dir, best_score, best_epoch)


@torch.inference_mode()
def _validate(model, criterion, x, y, device, dtype, batch_size) -> tuple[np.ndarray, float]:
    model.eval()
    probs, losses = [], []
    for s in range(0, x.shape[0], batch_size):
        with autocast(device, dtype):
            logits = model(x[s:s + batch_size])
        losses.append(criterion(logits, y[s:s + batch_size]).item() * len(logits))
        probs.append(torch.softmax(logits.float(), 1).cpu())
    return torch.cat(probs).numpy(), float(sum(losses) / x.shape[0])


def _plot(out_dir: Path, history: list[dict]) -> None:
    from .plots import plot_curves

    plot_curves(history, out_dir / "curves.png", title=f"{out_dir.parent.name}/{out_dir.name}")
