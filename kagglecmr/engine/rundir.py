"""Run folders: what ``train`` writes and ``ensemble``, ``pseudo-label``, ``runs`` and ``report`` read.

A run folder ``runs/<name>/`` holds ``run.json`` (the folds file and its sha256; the pseudo labels' folder
and manifest sha256 with ``train.pseudo.dir``) and one folder per fold, ``fold<k>/`` (``full/`` for
``--fold all``)::

    config.yaml  env.json  metrics.csv  curves.png  last.pt  best.safetensors  last.safetensors
    [swa.safetensors]  oof.npz  oof_last.npz  [oof_swa.npz]  summary.json  dataset.json
    tb/  (TensorBoard events, with ``train.log: [csv, tensorboard]``)
    train.lock  (only while a process trains the fold)

and beside the folds ``oof.json`` (the run's out-of-fold scores, once every fold has its predictions);
``ensemble`` adds ``postprocess.json`` and ``ensemble_oof.json``, ``kagglecmr report`` writes
``report.html``.  Everything here is plain files: no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from kagglecmr.cfg.config import Config
from kagglecmr.data.loader import Split
from kagglecmr.formats.competition_metric import Metric, MetricTable
from kagglecmr.formats.multilabel import task_table
from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.io import atomic_write_json, atomic_write_text
from kagglecmr.utils.locks import LOCK_NAME

FULL = "all"
RUN_JSON = "run.json"
ENSEMBLE_OOF = "ensemble_oof.json"


# ------------------------------------------------------------------------------------ fold folders
def fold_dir(run_dir: Path, fold) -> Path:
    return run_dir / ("full" if fold == FULL else f"fold{fold}")


# ------------------------------------------------------------------------------------- one fold
@dataclass
class FoldResult:
    fold: object
    out_dir: Path
    best_score: float
    best_epoch: int
    skipped: bool = False
    locked_by: str | None = None  # skipped because another trainer holds the fold's lock


def _config_for_resume(out_dir: Path) -> dict | None:
    p = out_dir / "config.yaml"
    return yaml.safe_load(p.read_text()) if p.is_file() else None


def prepare_dir(out_dir: Path, cfg: Config, force: bool) -> bool:
    """Create/validate the fold directory; returns True when the fold is already finished."""
    if out_dir.is_dir() and force:  # everything but the lock this process holds
        for p in out_dir.iterdir():
            if p.name != LOCK_NAME:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = _config_for_resume(out_dir)
    if saved is not None:  # filled with today's defaults, so folds trained before a new key still resume
        with contextlib.suppress(Exception):  # an invalid old config simply differs, reported below
            saved = Config.model_validate(saved).to_dict()
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


def full_fit_epochs(run_dir: Path, cfg: Config | None = None) -> int:
    """Epochs for ``--fold all``: the median best epoch of the run's finished CV folds (with
    ``train.select: last | swa``, the configured epochs: no epoch was chosen on a fold)."""
    if cfg is not None and cfg.train.select != "best":
        return cfg.train.epochs
    best = []
    for p in sorted(run_dir.glob("fold*/summary.json")):
        best.append(json.loads(p.read_text())["best_epoch"])
    if not best:
        raise KaggleCMRError(f"{run_dir}: --fold all takes its epochs from finished CV folds; train --fold 0..4 first")
    return max(1, int(round(float(np.median(best)))))


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


SCORE_BLOCK = 64  # images scored at once by oof_summary


def oof_summary(run_dir: Path, data: Split, n_folds: int, num_classes: int, metric: Metric | None = None,
                multilabel: bool = False) -> dict | None:
    """Score the run's out-of-fold predictions with ``metric`` (the dataset's; default Dice) once every fold
    has one (packed maps with ``multilabel``); writes ``oof.json``.

    ``score``/``per_class``: each fold's best validation epoch (chosen on the fold it is scored on:
    optimistic); ``score_last``/``per_class_last``: the last epoch (a fixed rule: honest);
    ``score_swa``/``per_class_swa`` when the folds kept an SWA model; ``select``: what ensembles use;
    ``metric``: what the scores are."""
    metric = metric or Metric()
    files = [run_dir / f"fold{k}" / "oof.npz" for k in range(n_folds)]
    if not all(f.is_file() for f in files):
        return None
    result = {}
    for suffix, name in (("", "oof.npz"), ("_last", "oof_last.npz"), ("_swa", "oof_swa.npz")):
        files = [run_dir / f"fold{k}" / name for k in range(n_folds)]
        if not all(f.is_file() for f in files):
            continue
        ids, tables = [], []
        for f in files:  # one fold's labels at a time, scored a block of images at a time
            fold_ids, (labels,) = read_oof_labels([f])
            masks = data.subset(fold_ids).masks
            tables += [task_table(labels[s:s + SCORE_BLOCK], masks[s:s + SCORE_BLOCK], num_classes, multilabel, metric)
                       for s in range(0, len(fold_ids), SCORE_BLOCK)]
            ids += fold_ids
        table = MetricTable.concat(tables)
        result |= {f"score{suffix}": table.score, f"per_class{suffix}": per_class(table)}
        if not suffix:
            result |= {"images": len(ids), "rows": len(table) * len(table.classes), "metric": metric.to_dict()}
    summary = run_dir / "fold0" / "summary.json"
    result["select"] = json.loads(summary.read_text()).get("select", "best") if summary.is_file() else "best"
    atomic_write_json(run_dir / "oof.json", result)
    return result


def per_class(table: MetricTable) -> dict[str, float]:
    """``{class: score}`` of a table's scored classes (JSON keys)."""
    return {str(k): float(v) for k, v in zip(table.classes, table.per_class)}


def metric_title(record: dict | None) -> str:
    """The printed name of the metric a record (``oof.json``, ``summary.json``, ...) holds; Dice for old ones."""
    try:
        return Metric.from_dict((record or {}).get("metric")).title
    except KaggleCMRError:
        return "score"


def print_oof(oof: dict, run_dir: Path) -> None:
    """The honest (last-epoch) OOF line first, then the best-epoch one (and SWA)."""
    def per(key):
        return " ".join(f"{k}:{v:.4f}" for k, v in oof[key].items())

    title = metric_title(oof)
    if "score_last" in oof:
        print(f"out-of-fold {title} at the last epoch (honest) {oof['score_last']:.4f} [{per('per_class_last')}]",
              flush=True)
    if "score_swa" in oof:
        print(f"out-of-fold {title} of SWA (honest) {oof['score_swa']:.4f} [{per('per_class_swa')}]", flush=True)
    print(f"out-of-fold {title} at the best epoch (chosen on the fold: optimistic) {oof['score']:.4f} over "
          f"{oof['rows']} rows [{per('per_class')}] -> {run_dir / 'oof.json'}", flush=True)


def write_run_info(run_dir: Path, folds_path: Path, pseudo: dict | None) -> dict:
    """``run.json``: the folds file (and sha256) the run trains on, and its pseudo labels; refuses a run
    folder that already trained on another folds file."""
    info = {"folds": str(folds_path), "folds_sha256": sha256_file(folds_path), "pseudo": pseudo}
    old = run_info(run_dir)
    if old.get("folds_sha256") not in (None, info["folds_sha256"]):
        raise KaggleCMRError(f"{run_dir / RUN_JSON}: the run trained on another folds file ({old.get('folds')}); "
                             f"use --name for a new run")
    if old != info:
        atomic_write_json(run_dir / RUN_JSON, info)
    return info


def report_fold(res: FoldResult, title: str = "Dice") -> None:
    if not res.skipped and res.fold != FULL:
        print(f"fold {res.fold}: best {title} {res.best_score:.4f} at epoch {res.best_epoch}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_info(run_dir: Path) -> dict:
    """``run.json`` of a run folder (folds file and its sha256, pseudo labels), or ``{}`` for old runs."""
    p = Path(run_dir) / RUN_JSON
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        raise KaggleCMRError(f"{p}: not valid JSON") from None


def run_folds_sha(run_dir: Path) -> str | None:
    """The sha256 of the folds file a run trained on: its own, or that of its pseudo labels' manifest."""
    return run_info(run_dir).get("folds_sha256")


def check_same_folds(run_dirs: list[Path], what: str = "runs") -> str | None:
    """Refuse runs trained on different folds files (or on pseudo labels made on different folds files).

    Returns the common folds sha256 (``None`` when no run recorded one: trained before ``run.json``)."""
    seen: dict[str, Path] = {}
    for r in run_dirs:
        info = run_info(r)
        shas = {info.get("folds_sha256"), (info.get("pseudo") or {}).get("folds_sha256")} - {None}
        for sha in shas:
            seen.setdefault(sha, Path(r))
    if len(seen) > 1:
        (a, pa), (b, pb) = list(seen.items())[:2]
        raise KaggleCMRError(f"{pb}: {what} trained on another folds file than {pa} "
                             f"(sha256 {b[:12]} vs {a[:12]}); OOF predictions would mix hold-outs")
    return next(iter(seen), None)



# ------------------------------------------------------------------------------------ json records
def read_json(path: Path) -> dict | None:
    """A JSON object, or None when the file is absent or unreadable (a half-written run is normal)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _as_table(t) -> MetricTable:
    """A metric table, or Dice rows ``[images, classes]`` of classes 1.. (as written before metric tables)."""
    if isinstance(t, MetricTable):
        return t
    t = np.asarray(t, dtype=np.float64)
    z = np.zeros(t.shape, np.int64)
    return MetricTable(Metric(), z, z, z, tuple(range(1, t.shape[1] + 1)), t)


def record_ensemble_oof(run_dir: str | os.PathLike, passes: list[str], table: MetricTable,
                        pp_table: MetricTable | None = None, plan: dict | None = None) -> Path:
    """Merge one OOF result of ``ensemble`` (the metric's table for the TTA set ``passes``, and the table
    after the postprocessing ``plan``) into ``<run>/ensemble_oof.json``."""
    def entry(t):
        return {"score": t.score, "per_class": per_class(t)}

    table, pp_table = _as_table(table), None if pp_table is None else _as_table(pp_table)
    path = Path(run_dir) / ENSEMBLE_OOF
    record = read_json(path) or {}
    if record.get("metric", Metric().to_dict()) != table.metric.to_dict():
        record = {}  # entries of another metric (the dataset file changed) cannot be compared
    record["metric"] = table.metric.to_dict()
    e = entry(table) | {"tta": list(passes), "images": len(table)}
    if pp_table is not None:
        e["postprocess"] = entry(pp_table) | {"plan": plan}
    record.setdefault("entries", {})["+".join(passes)] = e
    return atomic_write_json(path, record)
