"""Per-fold training: ``kagglecmr train --fold 0..4``.

One fold reads top to bottom in :func:`train_fold`: data in memory, model, optimiser, schedule,
resume from ``last.pt``, the epoch loop (augment, forward/backward, validate with the leaderboard
metric, keep ``best`` and ``last``), then out-of-fold probabilities from ``best``.

Run directory ``runs/<name>/fold<k>/`` (``full/`` for ``--fold all``)::

    config.yaml  env.json  metrics.csv  curves.png  last.pt  best.safetensors  oof.npz  summary.json

Every epoch re-seeds from ``(seed, fold, epoch)``, so resuming after a crash (even kill -9) replays
exactly what an uninterrupted run would have done: on the CPU the metrics are identical.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from . import augment as aug
from .config import Config
from .data import Split, load_labelled
from .errors import KaggleCMRError
from .infer import predict_proba, to_tensor
from .io import atomic_path, atomic_write_json, atomic_write_text
from .losses import build_loss
from .models import build_model, count_parameters
from .runtime import (
    amp_dtype,
    autocast,
    cpu_count,
    environment,
    peak_memory_mb,
    resolve_device,
    seed_everything,
    setup_threads,
)
from .score import dice_table

FULL = "all"
FULL_SEED_SLOT = 1_000_000  # stands in for the fold number when seeding the full fit (seeds must be >= 0)
THREADS_ENV = "KAGGLECMR_THREADS"  # set for child processes of --jobs
TIME_COLUMNS = ("time_s", "data_s", "model_s", "val_s")


# ------------------------------------------------------------------------------------------ folds
def parse_fold_spec(spec: str, n_folds: int) -> list:
    """``0`` | ``0..4`` | ``0,2,4`` | ``all`` (full fit) -> list of fold numbers or ``"all"``."""
    s = str(spec).strip().lower()
    if s == FULL:
        return [FULL]
    try:
        if ".." in s:
            a, b = s.split("..")
            folds = list(range(int(a), int(b) + 1))
        else:
            folds = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise KaggleCMRError(f"--fold {spec}: expected 0, 0..4, 0,2,4 or all") from None
    if not folds:
        raise KaggleCMRError(f"--fold {spec}: no folds given")
    bad = [f for f in folds if not 0 <= f < n_folds]
    if bad:
        raise KaggleCMRError(f"--fold {spec}: fold {bad[0]} out of range 0..{n_folds - 1} (folds file has {n_folds})")
    return sorted(set(folds))


def fold_dir(run_dir: Path, fold) -> Path:
    return run_dir / ("full" if fold == FULL else f"fold{fold}")


# ------------------------------------------------------------------------------------ checkpoints
def save_best(path: Path, model: torch.nn.Module, cfg: Config, epoch: int, score: float) -> None:
    """Model weights as safetensors, with the config and epoch in its metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(cfg.to_dict()), "epoch": str(epoch), "score": repr(float(score))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_best(path: Path) -> tuple[dict, dict]:
    """``(state_dict, metadata)`` of a ``best.safetensors``; metadata["config"] is a dict."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as exc:
        raise KaggleCMRError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    try:
        meta["config"] = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError:
        raise KaggleCMRError(f"{path}: checkpoint metadata is corrupt") from None
    return sd, meta


def save_last(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_last(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KaggleCMRError(f"{path}: cannot resume, checkpoint unreadable ({type(exc).__name__}); "
                             f"rerun with --force to start the fold again") from None


class EMA:
    """Exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


# ---------------------------------------------------------------------------------- scheduling
def lr_lambda(cfg: Config, steps_per_epoch: int):
    total = cfg.train.epochs * steps_per_epoch
    warm = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    floor = cfg.train.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.train.scheduler == "constant":
            return 1.0
        t = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def build_optimizer(cfg: Config, model: torch.nn.Module, *, capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD without weight decay on norms and biases.  ``capturable``: Adam state and the
    learning rate live on the GPU as tensors, so the step can be replayed from a CUDA graph."""
    t = cfg.train
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, nesterov=True)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    if capturable:
        device = next(model.parameters()).device
        return cls(groups, lr=torch.tensor(t.lr, device=device), capturable=True)
    return cls(groups, lr=t.lr)


def use_cuda_graphs(cfg: Config, device: torch.device, dtype) -> bool:
    """Graph the training step on GPUs unless something in it needs the host (fp16 loss scaling,
    torch.compile, SGD's float learning rate)."""
    t = cfg.train
    return (t.cuda_graphs and device.type == "cuda" and dtype != torch.float16 and not t.compile
            and t.optimizer in ("adam", "adamw"))


class GraphedStep:
    """The whole training step (forward, loss, backward, clipping, optimiser, EMA) captured once in a
    CUDA graph and replayed for every batch: one launch instead of hundreds, which is what a small
    model on a big GPU is bound by.

    Capture needs a few warm-up steps; every weight, buffer and optimiser/EMA state they touch is put
    back afterwards, so graphing does not change what is trained.  If the step cannot be captured
    (an op that synchronises with the host), :meth:`capture` returns ``None`` and training runs eagerly.
    """

    def __init__(self, step, state_tensors, x: torch.Tensor, y: torch.Tensor, optimizer):
        self.step, self.state_tensors, self.optimizer = step, state_tensors, optimizer
        self.x, self.y = x.clone(), y.clone()
        self.lrs = [g["lr"] for g in optimizer.param_groups]

    @classmethod
    def capture(cls, step, state_tensors, x, y, optimizer, warmup: int = 3) -> GraphedStep | None:
        g = cls(step, state_tensors, x, y, optimizer)
        before = [t.detach().clone() for t in state_tensors()]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    optimizer.zero_grad(set_to_none=True)
                    step(g.x, g.y)
            torch.cuda.current_stream().wait_stream(side)
            g.graph = torch.cuda.CUDAGraph()
            optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(g.graph):
                g.loss = step(g.x, g.y)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
            print(f"note: training step not captured in a CUDA graph ({type(exc).__name__}); running eagerly",
                  flush=True)
            g = None
        with torch.no_grad():
            for k, t in enumerate(state_tensors()):
                if k < len(before):
                    t.copy_(before[k])
                else:  # created by the warm-up: fresh Adam moments and step counts start at 0
                    t.zero_()
        optimizer.zero_grad(set_to_none=g is None)
        return g

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for t, group in zip(self.lrs, self.optimizer.param_groups):  # the scheduler may set a float
            if group["lr"] is not t:
                t.fill_(float(group["lr"]))
                group["lr"] = t
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.loss


# ---------------------------------------------------------------------------------------- batches
class BatchMaker:
    """Augmented training batches from in-memory uint8 arrays.

    ``albumentations``: per-sample pipeline on the host, then one upload per batch.
    ``torch``: the whole training set lives on the device and batches are augmented there.
    """

    def __init__(self, cfg: Config, images: np.ndarray, masks: np.ndarray, device: torch.device):
        self.cfg, self.device = cfg, device
        self.backend = aug.resolve_backend(cfg.augment, device)
        self.channels_last = cfg.train.channels_last
        if self.backend == "torch":
            self.x = to_tensor(images, device, channels_last=False)
            self.y = torch.from_numpy(masks).to(device).long()
            self.torch_aug = aug.TorchAugment(cfg.augment)
            self.gen = torch.Generator(device=device)
        else:
            self.images, self.masks = images, masks
            self.pipeline = aug.build_albumentations(cfg.augment)

    def reseed(self, seed: int) -> None:
        if self.backend == "torch":
            self.gen.manual_seed(seed)
        else:
            self.pipeline.set_random_seed(seed)

    def __call__(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "torch":
            ii = torch.from_numpy(idx).to(self.device)
            x, y = self.torch_aug(self.x[ii], self.y[ii], self.gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return x, y
        im, m = aug.augment_batch_albumentations(self.pipeline, self.images[idx], self.masks[idx])
        x = to_tensor(im, self.device, self.channels_last)
        return x, torch.from_numpy(m).to(self.device, non_blocking=True).long()


# ------------------------------------------------------------------------------------ reporting
class Reporter:
    """A rich progress bar on a terminal; one plain line per epoch otherwise (or with --quiet)."""

    def __init__(self, title: str, epochs: int, quiet: bool):
        self.title, self.epochs = title, epochs
        self.live = not quiet and sys.stdout.isatty()
        self.progress = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self.progress.start()
            self.task = self.progress.add_task(title, total=epochs, info="")

    def step(self, epoch: int, loss: float) -> None:
        if self.progress:
            self.progress.update(self.task, info=f"epoch {epoch + 1} loss {loss:.4f}")

    def epoch(self, row: dict) -> None:
        dice = " ".join(f"{k[5:]}:{v:.3f}" for k, v in row.items() if k.startswith("dice_"))
        info = f"loss {row['train_loss']:.4f}"
        if not math.isnan(row["val_dice"]):
            info += f" val {row['val_dice']:.4f} [{dice}]" + (" *" if row["best"] else "")
        if self.progress:
            self.progress.update(self.task, completed=row["epoch"], info=info)
        else:
            print(f"{self.title} epoch {row['epoch']}/{self.epochs} {info} ({row['time_s']:.1f}s)", flush=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()


def write_metrics(path: Path, history: list[dict]) -> None:
    if not history:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0].keys()), lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------------- one fold
@dataclass
class FoldResult:
    fold: object
    out_dir: Path
    best_score: float
    best_epoch: int
    skipped: bool = False


def _config_for_resume(out_dir: Path) -> dict | None:
    p = out_dir / "config.yaml"
    return yaml.safe_load(p.read_text()) if p.is_file() else None


def _prepare_dir(out_dir: Path, cfg: Config, force: bool) -> bool:
    """Create/validate the fold directory; returns True when the fold is already finished."""
    if out_dir.is_dir() and force:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = _config_for_resume(out_dir)
    if saved is not None and _recipe(saved) != _recipe(cfg.to_dict()):
        changed = sorted(_diff_keys(_recipe(saved), _recipe(cfg.to_dict())))
        raise KaggleCMRError(f"{out_dir}: holds a run with another config (differs in {', '.join(changed[:4])}); "
                             f"use --force to replace it or --name for a new run")
    if (out_dir / "summary.json").is_file():
        return True
    atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    return False


def _recipe(cfg: dict) -> dict:
    """The config without where it runs and logs (device, threads, log): those may change on resume."""
    train = {k: v for k, v in cfg.get("train", {}).items() if k not in ("device", "threads", "log")}
    return cfg | {"train": train}


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def full_fit_epochs(run_dir: Path) -> int:
    """Epochs for ``--fold all``: the median best epoch of the run's finished CV folds."""
    best = []
    for p in sorted(run_dir.glob("fold*/summary.json")):
        best.append(json.loads(p.read_text())["best_epoch"])
    if not best:
        raise KaggleCMRError(f"{run_dir}: --fold all takes its epochs from finished CV folds; train --fold 0..4 first")
    return max(1, int(round(float(np.median(best)))))


def train_fold(cfg: Config, data: Split, folds_df, fold, out_dir: Path, *, device: torch.device,
               force: bool = False, quiet: bool = False) -> FoldResult:
    t_start = time.time()
    if _prepare_dir(out_dir, cfg, force):
        summary = json.loads((out_dir / "summary.json").read_text())
        best = "" if summary["best_score"] is None else f"best {summary['best_score']:.4f} at "
        print(f"{out_dir}: already finished ({best}epoch {summary['best_epoch']}); --force retrains it", flush=True)
        best_score = float("nan") if summary["best_score"] is None else summary["best_score"]
        return FoldResult(fold, out_dir, best_score, summary["best_epoch"], skipped=True)

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
    from .tracking import Tracker

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
                save_best(best_path, eval_model, cfg, best_epoch, best_score)
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


# ------------------------------------------------------------------------------------ OOF summary
def read_oof_labels(files: list[Path]) -> tuple[list[str], list[np.ndarray]]:
    """Ids and argmax masks of ``oof.npz`` files (one uint8 ``[n, H, W]`` array per file).

    Uses the ``labels`` saved from the float32 probabilities (the masks the fold Dice was computed
    on); the float16 ``probs`` are only a fallback for files written before ``labels``."""
    ids, preds = [], []
    for f in files:
        with np.load(f) as z:
            ids += [str(i) for i in z["ids"]]
            preds.append(z["labels"] if "labels" in z.files else z["probs"].astype(np.float32).argmax(1).astype(np.uint8))
    return ids, preds


def oof_summary(run_dir: Path, data: Split, n_folds: int, num_classes: int) -> dict | None:
    """Score the run's out-of-fold predictions once every fold has one; writes ``oof.json``."""
    files = [run_dir / f"fold{k}" / "oof.npz" for k in range(n_folds)]
    if not all(f.is_file() for f in files):
        return None
    ids, preds = read_oof_labels(files)
    truth = data.subset(ids).masks
    table = dice_table(np.concatenate(preds), truth, num_classes)
    result = {"score": float(table.mean()), "images": len(ids), "rows": int(table.size),
              "per_class": {str(k): float(table[:, k - 1].mean()) for k in range(1, num_classes)}}
    atomic_write_json(run_dir / "oof.json", result)
    return result


# ----------------------------------------------------------------------------------------- entry
def run_train(cfg: Config, *, fold_spec: str, data_root: Path, folds_path: Path, name: str | None,
              runs_dir: Path, device: str | None, force: bool, quiet: bool, jobs: int = 1) -> list[FoldResult]:
    from .folds import read_folds

    dev = resolve_device(device or cfg.train.device)
    threads = int(os.environ.get(THREADS_ENV, "0")) or cfg.train.threads
    setup_threads(threads)
    name = name or cfg.name or "run"
    run_dir = Path(runs_dir) / name
    data = load_labelled(data_root, cfg.data.spec())
    folds_df = read_folds(folds_path, ids=data.ids)
    n_folds = int(folds_df["fold"].max()) + 1
    folds = parse_fold_spec(fold_spec, n_folds)
    print(f"run {run_dir} | {cfg.model.arch}/{cfg.model.encoder} | {len(data)} labelled images | "
          f"device {dev} | folds {folds}" + (f" | {jobs} at a time" if jobs > 1 else ""), flush=True)
    if jobs > 1 and len(folds) > 1 and FULL not in folds:
        results = _train_parallel(cfg, folds, jobs, data_root=data_root, folds_path=folds_path, run_dir=run_dir,
                                  device=str(dev), force=force)
    else:
        results = []
        for fold in folds:
            fcfg = cfg
            if fold == FULL:
                fcfg = cfg.model_copy(deep=True)
                fcfg.train.epochs = full_fit_epochs(run_dir)
            res = train_fold(fcfg, data, folds_df, fold, fold_dir(run_dir, fold), device=dev, force=force,
                             quiet=quiet)
            if not res.skipped and fold != FULL:
                print(f"fold {fold}: best Dice {res.best_score:.4f} at epoch {res.best_epoch}", flush=True)
            results.append(res)
    oof = oof_summary(run_dir, data, n_folds, cfg.data.num_classes)
    if oof is not None:
        per = " ".join(f"{k}:{v:.4f}" for k, v in oof["per_class"].items())
        print(f"out-of-fold Dice {oof['score']:.4f} over {oof['rows']} rows [{per}] -> {run_dir / 'oof.json'}",
              flush=True)
    return results


def _train_parallel(cfg: Config, folds: list, jobs: int, *, data_root: Path, folds_path: Path, run_dir: Path,
                    device: str, force: bool) -> list[FoldResult]:
    """Train folds in ``jobs`` child processes at once (several folds share one GPU; CPU threads split)."""
    import subprocess

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    atomic_write_text(cfg_path, cfg.to_yaml())
    env = os.environ | {THREADS_ENV: str(max(1, cpu_count() // jobs))}
    base = [sys.executable, "-m", "kagglecmr", "train", "--config", str(cfg_path), "--data", str(data_root),
            "--folds", str(folds_path), "--name", run_dir.name, "--runs-dir", str(run_dir.parent),
            "--device", device, "--quiet"] + (["--force"] if force else [])
    pending, running, failed = list(folds), [], []
    while pending or running:
        while pending and len(running) < jobs:
            k = pending.pop(0)
            running.append((k, subprocess.Popen([*base, "--fold", str(k)], env=env)))
        time.sleep(0.2)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                if item[1].returncode != 0:
                    failed.append(item[0])
    if failed:
        raise KaggleCMRError(f"{run_dir}: fold(s) {', '.join(map(str, failed))} failed (see the output above)")
    results = []
    for k in folds:
        summary = json.loads((fold_dir(run_dir, k) / "summary.json").read_text())
        results.append(FoldResult(k, fold_dir(run_dir, k), summary["best_score"], summary["best_epoch"]))
        print(f"fold {k}: best Dice {summary['best_score']:.4f} at epoch {summary['best_epoch']}", flush=True)
    return results
