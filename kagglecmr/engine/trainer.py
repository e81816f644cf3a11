"""Per-fold training: ``kagglecmr train --fold 0..4``.

One fold reads top to bottom in :func:`train_fold`: data in memory, model, optimiser, schedule,
resume from ``last.pt``, the epoch loop (augment, forward/backward, validate with the dataset's
metric, :func:`validation_scores`: keep ``best`` by its ``val_score`` and ``last``), then out-of-fold probabilities from ``best``, from the last epoch
(``oof_last.npz``: a fixed-epoch rule, not chosen on the fold it is scored on) and, with
``train.swa_epochs``, from the SWA average of the last epochs (``oof_swa.npz``; BatchNorm statistics
recomputed on the training images with :func:`torch.optim.swa_utils.update_bn`).  ``train.select``
names the model the fold keeps for ensembles (``best|last|swa.safetensors``, see
:func:`kagglecmr.models.checkpoint.model_file`).

With pseudo labels (``train.pseudo``, images from ``kagglecmr pseudo-label``), each batch holds
``round(ratio * batch_size)`` pseudo images drawn deterministically from the epoch seed; their loss
is added with weight ``train.pseudo.weight``.  They are never validated on.

The fold folder's files are listed in :mod:`kagglecmr.engine.orchestrate`; run orchestration (several folds, ``--jobs``,
the OOF summary) lives there too.

Every epoch re-seeds from ``(seed, fold, epoch)``, so resuming after a crash (even kill -9) replays
exactly what an uninterrupted run would have done: on the CPU the metrics are identical.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from kagglecmr.cfg.config import Config
from kagglecmr.data.batches import BatchMaker, to_tensor
from kagglecmr.data.dataset import described_metric
from kagglecmr.data.loader import Split
from kagglecmr.engine.cudagraph import use_cuda_graphs
from kagglecmr.engine.infer import predict_proba, predict_proba_tiled
from kagglecmr.engine.optim import lr_lambda
from kagglecmr.engine.presence import has_presence, presence_tiled
from kagglecmr.engine.rundir import FULL, FoldResult, fold_dir, prepare_dir
from kagglecmr.engine.tiles import needs_tiles
from kagglecmr.engine.warm import step_state
from kagglecmr.formats.competition_metric import VOID, Metric, MetricTable
from kagglecmr.formats.multilabel import task_labels, task_table
from kagglecmr.models.checkpoint import MODEL_FILES, load_best, load_last, save_best, save_last
from kagglecmr.models.factory import build_model, count_parameters, probabilities
from kagglecmr.utils.io import atomic_path, atomic_write_json
from kagglecmr.utils.locks import FoldLock, FoldLocked
from kagglecmr.utils.npz import NpzWriter
from kagglecmr.utils.plots import plot_curves
from kagglecmr.utils.progress import Reporter, write_metrics
from kagglecmr.utils.runtime import amp_dtype, autocast, environment, peak_memory_mb, release_memory, seed_everything
from kagglecmr.utils.tracking import Tracker

FULL_SEED_SLOT = 1_000_000  # stands in for the fold number when seeding the full fit (seeds must be >= 0)
TIME_COLUMNS = ("time_s", "data_s", "model_s", "val_s")


def train_fold(cfg: Config, data: Split, folds_df, fold, out_dir: Path, *, device: torch.device,
               force: bool = False, quiet: bool = False, dataset: dict | None = None,
               pseudo: Split | None = None, env_extra: dict | None = None) -> FoldResult:
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
    n_pseudo = min(int(round(cfg.train.pseudo.ratio * bs)), bs - 1) if pseudo is not None and len(pseudo) else 0
    bs_lab = bs - n_pseudo  # labelled images per batch; an epoch still passes over each once
    steps_per_epoch = max(1, len(tr) // bs_lab)  # drop the ragged last batch (BatchNorm on tiny batches)
    metric = described_metric(dataset)  # the dataset's metric picks the best epoch (Dice for old runs)
    mask_fill = VOID if dataset and dataset.get("ignore") else 0  # augmentation's border: void where there is one

    # ---- model, optimiser, schedule, loss: the process's warm step state when the last fold had the same shapes
    fold_num = FULL_SEED_SLOT if fold == FULL else int(fold)
    seed_everything(cfg.seed, fold_num)
    t_setup = time.time()
    dtype = amp_dtype(cfg.train.amp, device)
    st, warm = step_state(cfg, build_model(cfg), device, dtype, use_cuda_graphs(cfg, device, dtype), bs_lab, n_pseudo)
    model, optimizer, criterion, ema, swa = st.model, st.optimizer, st.criterion, st.ema, st.swa
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    swa_start = cfg.train.epochs - cfg.train.swa_epochs  # epochs (0-based) from which SWA averages
    max_steps = cfg.train.max_steps
    tiled = va is not None and cfg.tile is not None and needs_tiles(va.images.shape[1:3], cfg.tile.size)

    batches = BatchMaker(cfg, tr.images, tr.masks, device, mask_fill=mask_fill)
    pseudo_batches = BatchMaker(cfg, pseudo.images, pseudo.masks, device, mask_fill=mask_fill) if n_pseudo else None

    # ---- resume
    history, start_epoch, best_score, best_epoch = [], 0, -1.0, 0
    last_path, best_path = out_dir / "last.pt", out_dir / "best.safetensors"
    if last_path.is_file():
        state = load_last(last_path)
        model.load_state_dict(state["model"])
        st.load_optimizer(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        st.scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.model.load_state_dict(state["ema"])
        if swa is not None and state.get("swa") is not None:
            swa.load_state_dict(state["swa"])
        if st.graphs:  # the learning rate must stay a tensor on the GPU for the captured optimiser
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        history, start_epoch = state["history"], state["epoch"]
        best_score, best_epoch = state["best_score"], state["best_epoch"]
        print(f"{out_dir}: resuming after epoch {start_epoch}", flush=True)
    env = environment(device) | {"parameters": count_parameters(model), "train_images": len(tr),
                                 "val_images": len(val_ids), "augment_backend": batches.backend,
                                 "cuda_graphs": st.graphs, "warm_start": warm,
                                 "setup_s": round(time.time() - t_setup, 3), "pseudo_images": len(pseudo) if n_pseudo else 0,
                                 "amp": str(dtype).replace("torch.", "") if dtype else "float32"} | (env_extra or {})
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
            if n_pseudo:  # the pseudo images of this epoch: shuffled passes over them, cut into batches
                pseudo_seed = int(np.random.SeedSequence([epoch_seed, 1]).generate_state(1)[0])
                pseudo_batches.reseed(pseudo_seed)
                prng = np.random.default_rng(pseudo_seed)
                reps = -(-steps_per_epoch * n_pseudo // len(pseudo))
                pperm = np.concatenate([prng.permutation(len(pseudo)) for _ in range(reps)])
            model.train()
            data_s = model_s = loss_sum = 0.0
            steps_run = 0
            for step in range(steps_per_epoch):
                if max_steps is not None and epoch * steps_per_epoch + step >= max_steps:
                    break  # train.max_steps: the cap on optimiser steps of the fold (benchmarks, smoke runs)
                steps_run += 1
                ta = time.perf_counter()
                x, y = batches(perm[step * bs_lab:(step + 1) * bs_lab])
                if n_pseudo:
                    xp, yp = pseudo_batches(pperm[step * n_pseudo:(step + 1) * n_pseudo])
                    x, y = torch.cat([x, xp]), torch.cat([y, yp])
                    if cfg.train.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                tb = time.perf_counter()
                loss = st.step(x, y)  # replayed from a CUDA graph on GPUs (captured once per process)
                scheduler.step()
                loss_sum += loss.item()  # also synchronises, so model_s is honest on a GPU
                data_s += tb - ta
                model_s += time.perf_counter() - tb
                reporter.step(epoch, loss_sum / (step + 1))

            # validate with the dataset's metric (argmax masks; by default Dice per image and class, empty/empty = 1)
            tv = time.time()
            row = {"epoch": epoch + 1, "lr": float(optimizer.param_groups[0]["lr"]),
                   "train_loss": loss_sum / max(1, steps_run),
                   "val_loss": float("nan"), "val_dice": float("nan"), "val_score": float("nan")}
            row |= {f"dice_{k}": float("nan") for k in metric.scored(cfg.data.num_classes)}
            eval_model = ema.model if ema is not None else model
            if va is not None:
                # a block of images at a time; images larger than the tile: windows (data.patch / infer.tile),
                # no whole-image loss
                table, vloss = _validate(eval_model, criterion, va, cfg, device, dtype, tiled, metric)
                row |= {"val_loss": vloss} | table_scores(table)
                improved = row["val_score"] > best_score
            else:
                improved = True  # full fit: the last epoch is the model
            if improved:
                best_score = row["val_score"] if va is not None else float("nan")
                best_epoch = epoch + 1
                save_best(best_path, eval_model, cfg, best_epoch, best_score, dataset)
            row["best"] = bool(improved)
            if swa is not None and epoch >= swa_start:
                swa.update_parameters(eval_model)
            row |= {"time_s": time.time() - t0, "data_s": data_s, "model_s": model_s, "val_s": time.time() - tv}
            history.append(row)
            save_last(last_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": st.scaler.state_dict(),
                "ema": ema.model.state_dict() if ema is not None else None,
                "swa": swa.state_dict() if swa is not None else None,
                "epoch": epoch + 1, "history": history, "best_score": float(best_score), "best_epoch": best_epoch,
                "rng_torch": torch.get_rng_state(),
            })
            write_metrics(out_dir / "metrics.csv", history)
            tracker.epoch(row)
            reporter.epoch(row)
            if max_steps is not None and (epoch + 1) * steps_per_epoch >= max_steps:
                break
    finally:
        tracker.close()
        reporter.close()
    _plot(out_dir, history)

    # ---- the last epoch's and the SWA weights, then out-of-fold probabilities of best, last and swa
    eval_model = ema.model if ema is not None else model
    last_score = history[-1].get("val_score", history[-1]["val_dice"]) if history else float("nan")
    save_best(out_dir / MODEL_FILES["last"], eval_model, cfg, cfg.train.epochs, last_score)
    if swa is not None:  # the training images uploaded a batch at a time
        with autocast(device, dtype):
            torch.optim.swa_utils.update_bn((to_tensor(tr.images[s:s + bs], device, cfg.train.channels_last)
                                             for s in range(0, len(tr), bs)), swa, device)
        save_best(out_dir / MODEL_FILES["swa"], swa.module, cfg, cfg.train.epochs, float("nan"))
    if va is not None:
        _save_oof(out_dir / "oof_last.npz", eval_model, va, cfg, device, dtype, metric)
        if swa is not None:
            _save_oof(out_dir / "oof_swa.npz", swa.module, va, cfg, device, dtype, metric)
        if history and best_epoch == history[-1]["epoch"]:  # best is the last epoch: the same weights and predictions
            with atomic_path(out_dir / "oof.npz") as tmp:
                shutil.copyfile(out_dir / "oof_last.npz", tmp)
        else:
            sd, _ = load_best(best_path)  # the best epoch last: loading it overwrites the last epoch's weights
            model.load_state_dict(sd)
            _save_oof(out_dir / "oof.npz", model, va, cfg, device, dtype, metric)
    epochs_run = [r for r in history if r["epoch"] > start_epoch]
    summary = {
        "fold": fold, "best_score": None if math.isnan(best_score) else best_score, "best_epoch": best_epoch,
        "last_score": None if math.isnan(last_score) else last_score, "select": cfg.train.select,
        "metric": metric.to_dict(),
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


def validation_scores(labels: np.ndarray, masks: np.ndarray, metric: Metric, num_classes: int,
                      multilabel: bool = False) -> dict:
    """An epoch's validation numbers from argmax masks (:func:`table_scores` of their table)."""
    return table_scores(task_table(labels, masks, num_classes, multilabel, metric))


def table_scores(table: MetricTable) -> dict:
    """``val_score`` (the table's metric: what picks the best epoch), ``val_dice`` (mean Dice over the same rows,
    as before metrics were configurable) and ``dice_<k>`` per scored class; void truth pixels left out of all."""
    dice = MetricTable(Metric(classes=table.classes), table.inter, table.psize, table.tsize, table.classes)
    return ({"val_dice": dice.score, "val_score": table.score}
            | {f"dice_{k}": float(v) for k, v in zip(table.classes, dice.per_class)})


VAL_BLOCK_BYTES = 128 << 20  # validation and OOF hold the float32 probabilities of this many bytes of images at once


def _val_blocks(va: Split, cfg: Config):
    """``(start, images, masks)`` of the validation images a block at a time: as many as have probabilities of
    at most :data:`VAL_BLOCK_BYTES` (a small set is one block), whole batches of ``train.val_batch_size`` unless
    the images are predicted by tiles."""
    per_image = cfg.data.num_classes * int(np.prod(va.images.shape[1:3])) * 4
    bs = 1 if cfg.tile is not None and needs_tiles(va.images.shape[1:3], cfg.tile.size) else cfg.train.val_batch_size
    n = max(bs, VAL_BLOCK_BYTES // per_image // bs * bs)
    release_memory()  # what the training steps freed
    for s in range(0, len(va), n):
        yield s, va.images[s:s + n], np.asarray(va.masks[s:s + n])
        release_memory()  # the block's probabilities and windows, freed by the caller


def _block_probs(model, images: np.ndarray, cfg: Config, device, dtype) -> np.ndarray:
    """float32 probabilities of one block of images: by windows when larger than the tile."""
    if cfg.tile is not None and needs_tiles(images.shape[1:3], cfg.tile.size):
        return predict_proba_tiled(model, images, device, tile=cfg.tile, amp=dtype, channels_last=cfg.train.channels_last)
    x = to_tensor(images, device, cfg.train.channels_last)
    return predict_proba(model, x, device, batch_size=cfg.train.val_batch_size, amp=dtype)


def _save_oof(path: Path, model, va: Split, cfg: Config, device, dtype, metric: Metric | None = None) -> None:
    """``ids``, float16 ``probs``, argmax ``labels``, the Dice rows ``dice``, the metric's ``counts``
    (``|A∩B|, |A|, |B|`` ``[n, classes, 3]`` of the scored ``classes``) and row ``scores`` (and the cls head's
    ``presence``) of the fold's validation images, predicted and written a block at a time
    (:class:`~kagglecmr.utils.npz.NpzWriter`)."""
    n, (h, w), ml = len(va), va.images.shape[1:3], cfg.data.multilabel
    tables, out, presence = [], {}, []
    with NpzWriter(path) as npz:
        npz.add("ids", np.array(va.ids))
        for _, images, masks in _val_blocks(va, cfg):
            probs = _block_probs(model, images, cfg, device, dtype)
            if not out:  # the model's channels: classes, or foreground classes only (multilabel)
                out = {"probs": npz.array("probs", (n, probs.shape[1], h, w), np.float16),
                       "labels": npz.array("labels", (n, h, w), np.uint8)}
            labels = task_labels(probs, ml)  # from float32: float16 rounding can flip near-ties
            tables.append(task_table(labels, masks, cfg.data.num_classes, ml, metric))
            out["probs"].write(probs.astype(np.float16))
            out["labels"].write(labels)
            if has_presence(model):  # the cls head's [n, K-1], from the same block (never all images as one tensor)
                presence.append(presence_tiled(model, images, device, tile=cfg.tile,
                                               batch_size=cfg.train.val_batch_size, amp=dtype))
        table = MetricTable.concat(tables)
        npz.add("dice", Metric(classes=table.classes).from_counts(table.inter, table.psize, table.tsize))
        npz.add("counts", np.stack([table.inter, table.psize, table.tsize], -1))
        npz.add("classes", np.array(table.classes))
        npz.add("scores", table.rows)
        if presence:
            npz.add("presence", np.concatenate(presence))


@torch.inference_mode()
def _validate(model, criterion, va: Split, cfg: Config, device, dtype, tiled: bool,
              metric: Metric | None = None) -> tuple[MetricTable, float]:
    """The metric's table and the mean loss (nan when tiled) of the validation images, a block at a time."""
    model.eval()
    tables, losses, bs = [], [], cfg.train.val_batch_size
    for _, images, masks in _val_blocks(va, cfg):
        if tiled:
            probs = _block_probs(model, images, cfg, device, dtype)
        else:
            x, y = to_tensor(images, device, cfg.train.channels_last), torch.from_numpy(masks).to(device).long()
            probs = []
            for s in range(0, x.shape[0], bs):
                with autocast(device, dtype):
                    logits = model(x[s:s + bs])
                losses.append(criterion(logits, y[s:s + bs]).item() * len(logits))
                probs.append(probabilities(model, logits).cpu())
            probs = torch.cat(probs).numpy()
        tables.append(task_table(task_labels(probs, cfg.data.multilabel), masks, cfg.data.num_classes,
                                 cfg.data.multilabel, metric))
    return MetricTable.concat(tables), float(sum(losses) / len(va)) if not tiled else float("nan")


def _plot(out_dir: Path, history: list[dict]) -> None:

    plot_curves(history, out_dir / "curves.png", title=f"{out_dir.parent.name}/{out_dir.name}")


def train_locked(cfg: Config, data: Split, folds_df, fold, run_dir: Path, *, device, force: bool, quiet: bool,
                 skip_locked: bool = False, **extra) -> FoldResult:
    """Train one fold holding its lock; a fold another trainer holds raises :class:`FoldLocked`, or with
    ``skip_locked`` is skipped (a ``FoldResult`` with ``locked_by``) and says so."""
    out_dir = fold_dir(run_dir, fold)
    try:
        with FoldLock(out_dir):
            return train_fold(cfg, data, folds_df, fold, out_dir, device=device, force=force, quiet=quiet, **extra)
    except FoldLocked as exc:
        if not skip_locked:
            raise
        print(f"fold {fold}: skipped, {exc}", flush=True)
        return FoldResult(fold, out_dir, float("nan"), 0, skipped=True, locked_by=str(exc))
