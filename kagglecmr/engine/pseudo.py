"""Pseudo-labels of an unlabelled split: ``kagglecmr pseudo-label``, and reading them back for ``train --pseudo``.

The teachers are finished runs (``runs/<name>``) that all used the same folds file (``run.json``'s
``folds_sha256``).  The output folder holds one labelled dataset per fold and one for the full fit::

    DIR/fold<k>/train/image/<id>.png   DIR/fold<k>/train/mask/<id>_mask.png   (fold-k teacher models only)
    DIR/full/train/image/...           DIR/full/train/mask/...                (every model of every teacher)
    DIR/manifest.json

**Honest OOF.**  Fold k of a student is validated on fold k's held-out images, so the pseudo masks it
trains on must come from models that never saw those images either: DIR/fold<k> is predicted by the
teachers' fold-k models only (whose hold-out is exactly fold k).  The full fit and the submission may
use the whole ensemble (DIR/full).

A mask pixel is the ensemble's argmax class, or :data:`~kagglecmr.models.losses.IGNORE` (255) where the
ensemble's largest probability is below ``confidence``; every training loss leaves those pixels out.
Images without a single confident pixel are left out (they would teach nothing).  When the split has masks
(a labelled holdout), each fold's pseudo labels are also scored against them with the dataset's metric,
all pixels and the confident ones only, and the manifest records both.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from kagglecmr.cfg.config import Config
from kagglecmr.data.context import add_context
from kagglecmr.data.dataset import apply_dataset, load_dataset
from kagglecmr.data.loader import Split, discover, png_size, read_image
from kagglecmr.engine.infer import predict_proba_tiled
from kagglecmr.engine.rundir import RUN_JSON, check_same_folds, run_info, sha256_file
from kagglecmr.formats.competition_metric import MetricTable
from kagglecmr.models.checkpoint import check_select, load_best, model_file, selected_model_file
from kagglecmr.models.factory import build_model
from kagglecmr.models.losses import IGNORE
from kagglecmr.utils.errors import DataError, KaggleCMRError
from kagglecmr.utils.io import atomic_path, atomic_write_json
from kagglecmr.utils.runtime import amp_dtype, resolve_device, setup_threads

MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------------ reading
def read_manifest(pseudo_dir: Path) -> tuple[dict, str]:
    """``(manifest, sha256 of manifest.json)`` of a pseudo-label folder."""
    p = Path(pseudo_dir) / MANIFEST
    if not p.is_file():
        raise KaggleCMRError(f"{pseudo_dir}: no {MANIFEST} (not a folder written by kagglecmr pseudo-label)")
    try:
        manifest = json.loads(p.read_text())
    except json.JSONDecodeError:
        raise KaggleCMRError(f"{p}: not valid JSON") from None
    for key in ("folds_sha256", "n_folds", "folds"):
        if key not in manifest:
            raise KaggleCMRError(f"{p}: key '{key}' missing")
    return manifest, sha256_file(p)


def pseudo_fold_dir(pseudo_dir: Path, fold) -> Path:
    """The labelled folder a student's ``fold`` trains on: ``fold<k>``, or ``full`` for ``--fold all``."""
    return Path(pseudo_dir) / ("full" if fold == "all" else f"fold{int(fold)}")


def read_pseudo_mask(path: Path, spec) -> np.ndarray:
    import cv2

    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if Path(path).is_file() else None
    if m is None or m.ndim != 2 or m.dtype != np.uint8:
        raise DataError(f"{path}: not a one-channel 8-bit PNG mask")
    bad = np.unique(m[(m >= spec.num_classes) & (m != IGNORE)])
    if bad.size:
        raise DataError(f"{path}: mask value {int(bad[0])} is neither a class 0..{spec.num_classes - 1} nor {IGNORE}")
    if m.shape != (spec.size, spec.size):
        raise DataError(f"{path}: size {m.shape[1]}x{m.shape[0]}, expected {spec.size}x{spec.size}")
    return m


def load_pseudo(pseudo_dir: Path, fold, spec):
    """The pseudo-labelled images a student's ``fold`` trains on (a :class:`~kagglecmr.data.loader.Split`
    whose masks may hold 255 = ignore)."""

    root = pseudo_fold_dir(pseudo_dir, fold)
    if not (root / "train" / "image").is_dir():
        raise KaggleCMRError(f"{root}: missing (the pseudo-label folder has no labels for fold {fold})")
    items = discover(root, "train", labelled=True)
    return Split(ids=[i for i, _, _ in items], images=np.stack([read_image(ip, spec) for _, ip, _ in items]),
                 masks=np.stack([read_pseudo_mask(mp, spec) for _, _, mp in items]),
                 splits=["pseudo"] * len(items), image_paths=[ip for _, ip, _ in items])


def pseudo_for_run(pseudo_dir: Path, folds_sha: str, folds_path: Path) -> dict:
    """Check a pseudo-label folder against the student's folds file; returns what run.json/env.json record."""
    manifest, manifest_sha = read_manifest(pseudo_dir)
    if manifest["folds_sha256"] != folds_sha:
        raise KaggleCMRError(f"{Path(pseudo_dir) / MANIFEST}: made with folds file {manifest['folds']} "
                             f"(sha256 {manifest['folds_sha256'][:12]}), not {folds_path} ({folds_sha[:12]}); "
                             f"fold k's pseudo labels must come from teachers that held out fold k")
    return {"dir": str(pseudo_dir), "manifest_sha256": manifest_sha, "folds_sha256": manifest["folds_sha256"]}


# ------------------------------------------------------------------------------------------ teachers
def _fold_names(run_dir: Path) -> list[str]:
    dirs = sorted((d for d in Path(run_dir).glob("fold*") if d.name[4:].isdigit()), key=lambda d: int(d.name[4:]))
    return [d.name for d in dirs]


def _model_probs(path: Path, images: np.ndarray, device, passes, batch_size: int) -> np.ndarray:
    """Softmax of one teacher checkpoint over ``images`` (with its own context channels and TTA)."""
    sd, meta = load_best(path)
    cfg = Config.model_validate(meta["config"])
    model = build_model(cfg, weights="none", check_size=False)
    model.load_state_dict(sd)
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    return predict_proba_tiled(model, add_context(images, cfg.data.context), device, tile=cfg.tile, tta=passes,
                               batch_size=batch_size, amp=amp_dtype(cfg.train.amp, device))


def _teacher_dir(run: Path, name: str) -> Path:
    d = Path(run) / name
    if not (d / "summary.json").is_file():
        raise KaggleCMRError(f"{run}: {name} is missing or unfinished (train it before pseudo-labelling)")
    return d


def teacher_probs(run_dirs: list[Path], fold, images: np.ndarray, device, passes, batch_size: int,
                  select: str | None = None):
    """Mean softmax of the teachers' models for ``fold`` (one per run: its ``fold<k>`` model; ``"all"``:
    every fold model and the full fit of every run), and the checkpoint files read.  ``select`` (best, last,
    swa) picks that checkpoint of every fold instead of the one its ``train.select`` kept."""
    total, files = None, []
    for run in run_dirs:
        names = [f"fold{int(fold)}"] if fold != "all" else _fold_names(run) + (["full"] if (run / "full").is_dir() else [])
        for name in names:
            path = selected_model_file(_teacher_dir(run, name), select, run)
            p = _model_probs(path, images, device, passes, batch_size)
            total = p if total is None else total + p
            files.append(path)
    return total / len(files), files


def all_teacher_probs(run_dirs: list[Path], n_folds: int, images: np.ndarray, device, passes, batch_size: int,
                      select: str | None = None):
    """``[(fold, mean softmax, checkpoint files)]`` for every fold ``0..n_folds-1`` and then ``"all"``, each
    teacher model predicted once: fold k's models make fold k's labels and join the running sum of ``"all"``
    (with the full fits), so only one fold's probabilities and the sum are held at a time (a generator)."""
    all_sum, all_files = None, []
    for k in range(n_folds):
        fold_sum, files = None, []
        for run in run_dirs:
            path = selected_model_file(_teacher_dir(run, f"fold{k}"), select, run)
            p = _model_probs(path, images, device, passes, batch_size)
            fold_sum = p if fold_sum is None else fold_sum + p
            files.append(path)
        all_sum = fold_sum.copy() if all_sum is None else all_sum + fold_sum
        all_files += files
        yield k, fold_sum / len(files), files
    for run in run_dirs:
        if (Path(run) / "full").is_dir():
            path = selected_model_file(_teacher_dir(run, "full"), select, run)
            all_sum += _model_probs(path, images, device, passes, batch_size)
            all_files.append(path)
    yield "all", all_sum / len(all_files), all_files


def _holdout(fold_dir: Path) -> list[str] | None:
    """The ids a fold model never trained on (its ``oof.npz``); ``None`` for the full fit."""
    if not (fold_dir / "oof.npz").is_file():
        return None
    with np.load(fold_dir / "oof.npz") as z:
        return sorted(str(x) for x in z["ids"])


def _write_png(path: Path, arr: np.ndarray) -> None:
    import cv2

    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), arr):
            raise KaggleCMRError(f"{path}: cannot write PNG")


def _png_channels(img: np.ndarray) -> np.ndarray:
    """An RGB(-order) model input as the array cv2 writes to PNG: BGR; two channels as (R, G, 0), which
    :func:`~kagglecmr.data.loader.read_image` reads back as the same two."""
    if img.shape[2] == 2:
        img = np.concatenate([img, np.zeros_like(img[:, :, :1])], axis=2)
    return np.ascontiguousarray(img[:, :, ::-1]) if img.shape[2] == 3 else img


def _replace_dir(new: Path, out: Path) -> None:
    """Move the complete folder ``new`` to ``out``; an old ``out`` (``--force``) is renamed aside first and
    deleted only once the new one is in place (a crash in between leaves one of the two whole)."""
    aside = None
    if out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        aside.rmdir()
        out.rename(aside)
    try:
        new.rename(out)
    except OSError:
        if aside is not None:
            aside.rename(out)  # put the old one back
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


BLOCK_BYTES = 512 << 20  # float32 probabilities of at most this many bytes of images are held at once


def _block(data, cfg: Config) -> int:
    """Images pseudo-labelled at once: whole batches whose probabilities fit :data:`BLOCK_BYTES` (all of them with
    partner context, whose partners are found among the split's images)."""
    if cfg.data.context != "none":
        return max(1, len(data))
    per_image = cfg.data.num_classes * int(np.prod(data.images.shape[1:3])) * 4
    return max(1, BLOCK_BYTES // per_image)


def _mean(parts: list[tuple[float, int]]) -> float:
    """The mean over blocks from each block's ``(mean, count)`` (one block: its mean exactly)."""
    return parts[0][0] if len(parts) == 1 else sum(m * n for m, n in parts) / sum(n for _, n in parts)


def pseudo_label(*, runs: list[Path], data_root: Path, split: str = "test", out: Path | None = None,
                 confidence: float = 0.9, tta: bool = False, force: bool = False, device: str = "auto",
                 batch_size: int | None = None, select: str | None = None) -> dict:
    """Write ``out/fold<k>/``, ``out/full/`` and ``out/manifest.json`` (see the module docstring)."""

    if not runs:
        raise KaggleCMRError("--runs: give at least one teacher run")
    if not 0 <= confidence <= 1:
        raise KaggleCMRError(f"--confidence {confidence}: expected a probability 0..1")
    check_select(select)  # an unknown name is an error before anything is read or written
    runs = [Path(r) for r in runs]
    for r in runs:
        if not r.is_dir() or not _fold_names(r):
            raise KaggleCMRError(f"{r}: not a run folder with fold<k>/ inside")
    infos = [run_info(r) for r in runs]
    for r, info in zip(runs, infos):
        if not info.get("folds_sha256"):
            raise KaggleCMRError(f"{r / RUN_JSON}: missing, so the run's folds file is unknown (retrain the run)")
    folds_sha = check_same_folds(runs, "teachers")
    n_folds = {len(_fold_names(r)) for r in runs}
    if len(n_folds) != 1:
        raise KaggleCMRError(f"{runs[-1]}: teachers have different numbers of folds ({sorted(n_folds)})")
    n_folds = n_folds.pop()
    out = Path(out) if out is not None else Path("pseudo") / f"{'+'.join(r.name for r in runs)}-{split}"
    if out.exists() and not force:
        raise KaggleCMRError(f"{out}: already exists (use --force to replace it)")

    dev = resolve_device(device)
    setup_threads(0)
    _, meta = load_best(model_file(runs[0] / "fold0"))
    ds = load_dataset(data_root)  # a folder or a dataset file, read like training read it
    cfg = apply_dataset(Config.model_validate(meta["config"]), ds)  # the teachers' size, channels and classes
    if cfg.data.multilabel:
        raise KaggleCMRError(f"{ds.path}: pseudo-label writes one softmax class per pixel; task multilabel "
                             "(overlapping classes) is not supported yet")
    data = ds.load(split)  # with its masks when it has them: the pseudo labels are then scored against them
    copy_ok = ds.channels == list(range(len(ds.channels)))  # the file reads back as the same channels
    passes = list(cfg.infer.tta) if tta else ["none"]
    bsz = batch_size or cfg.infer.batch_size_for(dev.type)
    print(f"pseudo-labelling {len(data)} '{split}' images with {', '.join(r.name for r in runs)} | "
          f"TTA {'+'.join(passes)} | confidence {confidence} | device {dev}", flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        per_fold, tally = {}, {}
        step = _block(data, cfg)
        for start in range(0, len(data), step):  # a block of images at a time: its probabilities, never all
            sub = slice(start, start + step)
            images = data.images[sub]
            for fold, probs, files in all_teacher_probs(runs, n_folds, images, dev, passes, bsz, select):
                conf = probs.max(1)
                labels = probs.argmax(1).astype(np.uint8)
                labels[conf < confidence] = IGNORE
                root = pseudo_fold_dir(tmp, fold)
                t = tally.setdefault(root.name, {"stats": {}, "kept": 0, "conf": [], "ignored": [], "files": files,
                                                 "every": [], "sure": []})
                if data.masks is not None:  # scored a block at a time (the tables keep counts, not pixels)
                    truth, pred = data.masks[sub], probs.argmax(1)
                    t["every"].append(ds.metric.table_labels(pred, truth, ds.num_classes))
                    t["sure"].append(ds.metric.table_labels(pred, truth, ds.num_classes, ignore=conf < confidence))
                for i, ip, img, m, c in zip(data.ids[sub], data.image_paths[sub], images, labels, conf):
                    ignored = float((m == IGNORE).mean())
                    t["stats"][i] = {"mean_confidence": round(float(c.mean()), 5), "ignored_fraction": round(ignored, 5),
                                     "kept": ignored < 1.0}
                    if ignored >= 1.0:
                        continue
                    t["kept"] += 1
                    dst = root / "train" / "image" / f"{i}.png"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if copy_ok and Path(ip).suffix.lower() == ".png" and png_size(ip) == img.shape[:2]:
                        shutil.copyfile(ip, dst)
                    else:  # resized or channels picked on reading: store what the model saw
                        _write_png(dst, _png_channels(img))
                    _write_png(root / "train" / "mask" / f"{i}_mask.png", m)
                t["conf"].append((float(conf.mean()), conf.size))
                t["ignored"].append((float((labels == IGNORE).mean()), labels.size))
        for name, t in tally.items():
            mean_conf, ignored = _mean(t["conf"]), _mean(t["ignored"])
            per_fold[name] = {
                "teachers": [{"run": str(f.parent.parent), "checkpoint": str(f), "sha256": sha256_file(f),
                              "holdout": _holdout(f.parent)} for f in t["files"]],
                "images": t["kept"], "mean_confidence": mean_conf, "ignored_fraction": ignored,
                "per_image": t["stats"],
            }
            scored = ""
            if t["every"]:  # a labelled split: how good are the pseudo labels, all and confident pixels
                every, sure = MetricTable.concat(t["every"]).score, MetricTable.concat(t["sure"]).score
                per_fold[name] |= {"metric": ds.metric.to_dict(), "score": every, "score_confident": sure}
                scored = f"; {ds.metric.title} against the split's masks {every:.4f} (confident pixels only {sure:.4f})"
            print(f"{name}: {t['kept']}/{len(data)} images, mean confidence {mean_conf:.4f}, "
                  f"{ignored:.1%} of pixels ignored, from {len(t['files'])} model(s){scored}", flush=True)
        manifest = {
            "split": split, "data": str(data_root), "confidence": confidence, "tta": passes,
            "select": select or "train.select",
            "teachers": [{"run": str(r), "name": r.name, "folds_sha256": info["folds_sha256"],
                          "folds": info.get("folds")} for r, info in zip(runs, infos)],
            "folds": infos[0].get("folds"), "folds_sha256": folds_sha, "n_folds": n_folds,
            "ignore_value": IGNORE, "per_fold": per_fold,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"wrote pseudo labels to {out} (train --pseudo {out})", flush=True)
    return manifest
