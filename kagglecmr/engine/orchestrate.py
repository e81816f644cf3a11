"""Runs: fold specs, run folders, and ``kagglecmr train``'s orchestration of folds.

``run_train`` loads the labelled data and the folds file once, then trains the requested folds one after
another in this process (:func:`kagglecmr.engine.trainer.train_fold`, one warm-up for all: :mod:`kagglecmr.engine.warm`),
in ``--jobs N`` child processes each training a share of them (round-robin over the visible GPUs when
there are several), or as Ray tasks
(``--executor ray``, :mod:`kagglecmr.engine.executors`); when every fold has out-of-fold predictions it writes
the run's ``oof.json`` (best-epoch score,
plus ``score_last``, the honest fixed-epoch rule, and ``score_swa`` with SWA).  Each fold is trained under its fold lock (:mod:`kagglecmr.utils.locks`): a second
trainer of a fold is refused (exit 2), or, under ``--jobs`` and Ray, skips it.  SIGTERM stops a run like
Ctrl-C (exit 130): locks released, ``--jobs`` children stopped with it, the warm state freed.

Run directory ``runs/<name>/`` holds ``run.json`` (the folds file and its sha256; the pseudo labels'
folder and manifest sha256 with ``train.pseudo.dir``) and ``fold<k>/`` (``full/`` for ``--fold all``)::

    config.yaml  env.json  metrics.csv  curves.png  last.pt  best.safetensors  last.safetensors
    [swa.safetensors]  oof.npz  oof_last.npz  [oof_swa.npz]  summary.json  dataset.json
    tb/  (TensorBoard events, with ``train.log: [csv, tensorboard]``)
    train.lock  (only while a process trains the fold)

and beside the folds ``run.json`` (folds file, pseudo labels) and ``oof.json``; ``ensemble`` adds
``postprocess.json`` and ``ensemble_oof.json``, ``kagglecmr report`` writes ``report.html``.
``--seeds 42,43`` trains the same recipe once per seed as runs ``<name>-s42``, ``<name>-s43``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from kagglecmr.cfg.config import Config
from kagglecmr.data.context import add_context
from kagglecmr.data.dataset import prepare
from kagglecmr.data.folds import read_folds
from kagglecmr.engine import pseudo as pl
from kagglecmr.engine import warm
from kagglecmr.engine.executors import assign_devices, import_ray, train_ray
from kagglecmr.engine.rundir import (
    FULL,
    FoldResult,
    fold_dir,
    full_fit_epochs,
    oof_summary,
    print_oof,
    report_fold,
    sha256_file,
    write_run_info,
)
from kagglecmr.engine.trainer import train_locked
from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.io import atomic_write_text
from kagglecmr.utils.runtime import cpu_count, resolve_device, setup_threads

THREADS_ENV = "KAGGLECMR_THREADS"  # set for child processes of --jobs
SKIP_LOCKED_ENV = "KAGGLECMR_SKIP_LOCKED"  # set for child processes of --jobs: a locked fold is skipped
EXECUTORS = ("local", "ray")
STOP_GRACE_S = 10.0  # how long stopped --jobs children get to end before they are killed


class Terminated(KeyboardInterrupt):
    """SIGTERM during a run, raised in the main thread like Ctrl-C, so that ``finally`` blocks run: fold
    locks released, the warm state freed, ``--jobs`` children stopped."""


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into :class:`Terminated` for the block (main thread only: elsewhere nothing changes).
    A second SIGTERM ends the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated(f"stopped by signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def _clear_frames(exc: BaseException | None, seen: set | None = None) -> None:
    """Drop the local variables of the frames of a failed run (and of the exceptions it chained): they
    hold the model and optimiser, which an exception kept in a notebook would keep alive."""
    seen = set() if seen is None else seen
    if exc is None or id(exc) in seen:
        return
    seen.add(id(exc))
    traceback.clear_frames(exc.__traceback__)
    _clear_frames(exc.__cause__, seen)
    _clear_frames(exc.__context__, seen)


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


def fold_configs(cfg: Config, folds: list, run_dir: Path) -> list[tuple[object, Config]]:
    """``(fold, config)`` per fold: the full fit trains the median best epoch of the CV folds."""
    out = []
    for fold in folds:
        fcfg = cfg
        if fold == FULL:
            fcfg = cfg.model_copy(deep=True)
            epochs = full_fit_epochs(run_dir, cfg)
            fcfg.train.swa_epochs = min(fcfg.train.swa_epochs, epochs)  # first: validated on assignment
            fcfg.train.epochs = epochs
        out.append((fold, fcfg))
    return out


# ----------------------------------------------------------------------------------------- entry
def seed_runs(cfg: Config, seeds: str, name: str | None) -> list[tuple[Config, str]]:
    """``--seeds 42,43,44`` -> one (config with that seed, ``NAME-s<seed>``) per seed."""
    try:
        values = [int(s) for s in str(seeds).split(",") if s.strip()]
    except ValueError:
        raise KaggleCMRError(f"--seeds {seeds}: expected comma-separated integers, e.g. 42,43,44") from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise KaggleCMRError(f"--seeds {seeds}: expected distinct non-negative integers")
    base = name or cfg.name or "run"
    out = []
    for v in values:
        c = cfg.model_copy(deep=True)
        c.seed = v
        out.append((c, f"{base}-s{v}"))
    return out


def run_train(cfg: Config, *, fold_spec: str, data_root: Path, folds_path: Path, name: str | None,
              runs_dir: Path, device: str | None, force: bool, quiet: bool, jobs: int = 1,
              executor: str = "local", ray_address: str | None = None, seeds: str | None = None) -> list[FoldResult]:
    """Train the folds of ``fold_spec`` (each ``--seeds`` seed a run of its own).  The folds of the call
    share one warm-up (:mod:`kagglecmr.engine.warm`), which is freed when it returns or raises; SIGTERM
    stops it like Ctrl-C (locks released, ``--jobs`` children stopped)."""
    kw = {"fold_spec": fold_spec, "data_root": data_root, "folds_path": folds_path, "runs_dir": runs_dir,
          "device": device, "force": force, "quiet": quiet, "jobs": jobs, "executor": executor,
          "ray_address": ray_address}
    with _sigterm_raises():
        try:
            if not seeds:
                return _run(cfg, name=name, **kw)
            return [r for scfg, sname in seed_runs(cfg, seeds, name) for r in _run(scfg, name=sname, **kw)]
        except BaseException as exc:
            _clear_frames(exc)
            raise
        finally:
            warm.clear()


def _run(cfg: Config, *, fold_spec: str, data_root: Path, folds_path: Path, name: str | None, runs_dir: Path,
         device: str | None, force: bool, quiet: bool, jobs: int, executor: str,
         ray_address: str | None) -> list[FoldResult]:
    if executor not in EXECUTORS:
        raise KaggleCMRError(f"--executor {executor}: expected local or ray")
    if ray_address and executor != "ray":
        raise KaggleCMRError(f"--ray-address {ray_address}: needs --executor ray")
    if executor == "ray":
        if cfg.train.pseudo.dir:  # before anything is read or written
            raise KaggleCMRError("--pseudo: not supported with --executor ray yet (use the local executor)")
        import_ray()  # before any data is read: a missing extra is a one-line error at once
    device_spec = device or cfg.train.device
    dev = resolve_device(device_spec)
    threads = int(os.environ.get(THREADS_ENV, "0")) or cfg.train.threads
    setup_threads(threads)
    name = name or cfg.name or "run"
    run_dir = Path(runs_dir) / name
    cfg, ds, data = prepare(cfg, data_root)  # data keys from the dataset (folder or dataset file)
    data.images = add_context(data.images, cfg.data.context)  # partner frames: found among all labelled images
    folds_df = read_folds(folds_path, ids=data.ids)
    n_folds = int(folds_df["fold"].max()) + 1
    folds = parse_fold_spec(fold_spec, n_folds)
    pseudo_info = None
    if cfg.train.pseudo.dir:
        pseudo_info = pl.pseudo_for_run(Path(cfg.train.pseudo.dir), sha256_file(folds_path), folds_path)
    if FULL in folds:
        full_fit_epochs(run_dir, cfg)  # fails before anything is written when no CV fold has finished
    run_dir.mkdir(parents=True, exist_ok=True)
    info = write_run_info(run_dir, folds_path, pseudo_info)
    env_extra = {"folds": info["folds"], "folds_sha256": info["folds_sha256"]}
    if pseudo_info:
        env_extra |= {"pseudo_dir": pseudo_info["dir"], "pseudo_manifest_sha256": pseudo_info["manifest_sha256"]}
    print(f"run {run_dir} | {cfg.model.arch}/{cfg.model.encoder} | {len(data)} labelled images | "
          f"device {dev} | folds {folds}" + (f" | {jobs} at a time" if jobs > 1 else "")
          + (" | executor ray" if executor == "ray" else ""), flush=True)
    if executor == "ray":
        results = train_ray(fold_configs(cfg, folds, run_dir), data=data, folds_df=folds_df, run_dir=run_dir,
                            device=dev, force=force, jobs=jobs, address=ray_address,
                            dataset=ds.describe(), env_extra=env_extra)
    elif jobs > 1 and len(folds) > 1 and FULL not in folds:
        results = _train_parallel(cfg, folds, jobs, data_root=data_root, folds_path=folds_path, run_dir=run_dir,
                                  device=device_spec, force=force, title=ds.metric.title)
    else:
        skip_locked = bool(os.environ.get(SKIP_LOCKED_ENV))
        results = []
        for fold, fcfg in fold_configs(cfg, folds, run_dir):
            pseudo = pl.load_pseudo(Path(cfg.train.pseudo.dir), fold, cfg.data.spec()) if pseudo_info else None
            if pseudo is not None:
                pseudo.images = add_context(pseudo.images, cfg.data.context)
            fenv = env_extra | ({"pseudo_source": str(pl.pseudo_fold_dir(Path(cfg.train.pseudo.dir), fold))}
                                if pseudo_info else {})
            res = train_locked(fcfg, data, folds_df, fold, run_dir, device=dev, force=force, quiet=quiet,
                               skip_locked=skip_locked, dataset=ds.describe(), pseudo=pseudo, env_extra=fenv)
            report_fold(res, ds.metric.title)
            results.append(res)
    oof = oof_summary(run_dir, data, n_folds, cfg.data.num_classes, ds.metric, cfg.data.multilabel)
    if oof is not None:
        print_oof(oof, run_dir)
    return results


def chunk_folds(folds: list, jobs: int) -> list[list]:
    """The folds of each ``--jobs`` child process: ``0..4`` on 2 jobs -> ``[0, 2, 4], [1, 3]``.  A child
    trains its folds one after another with one warm-up (:mod:`kagglecmr.engine.warm`)."""
    return [folds[i::jobs] for i in range(min(jobs, len(folds)))]


def stop_children(procs: list, grace: float | None = None) -> None:
    """SIGTERM the processes still running (they release their fold locks and end), wait up to ``grace``
    seconds in all (:data:`STOP_GRACE_S`), then SIGKILL what is left (the kernel releases its locks)."""
    grace = STOP_GRACE_S if grace is None else grace
    alive = [p for p in procs if p.poll() is None]
    if not alive:
        return
    print(f"stopping {len(alive)} training process(es)", flush=True)
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _train_parallel(cfg: Config, folds: list, jobs: int, *, data_root: Path, folds_path: Path, run_dir: Path,
                    device: str, force: bool, title: str = "Dice") -> list[FoldResult]:
    """Train folds in ``jobs`` child processes at once, each a share of the folds one after another
    (:func:`chunk_folds`): round-robin over the visible GPUs when the device is auto/cuda and there are
    several (:func:`assign_devices`), else the children share one device; CPU threads are split.  A fold
    another trainer holds is skipped (the child says so).  When this process is stopped (Ctrl-C, SIGTERM,
    an error) the children are stopped too (SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`)."""
    import torch

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    atomic_write_text(cfg_path, cfg.to_yaml())
    env = os.environ | {THREADS_ENV: str(max(1, cpu_count() // jobs)), SKIP_LOCKED_ENV: "1"}
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    groups = chunk_folds(folds, jobs)
    devices = assign_devices(groups, device, n_gpus)
    if len(set(devices)) > 1:
        print("devices: " + ", ".join(f"folds {','.join(map(str, g))} -> {d}" for g, d in zip(groups, devices)),
              flush=True)
    base = [sys.executable, "-m", "kagglecmr", "train", "--config", str(cfg_path), "--data", str(data_root),
            "--folds", str(folds_path), "--name", run_dir.name, "--runs-dir", str(run_dir.parent),
            "--quiet"] + (["--force"] if force else [])
    children, failed = [], []
    try:
        for group, dev in zip(groups, devices):
            spec = ",".join(map(str, group))
            children.append((group, subprocess.Popen([*base, "--fold", spec, "--device", dev], env=env)))
        running = list(children)
        while running:
            time.sleep(0.2)
            for item in list(running):
                if item[1].poll() is not None:
                    running.remove(item)
                    if item[1].returncode != 0:
                        failed.append(item[0])
    except BaseException:
        stop_children([p for _, p in children])
        raise
    if failed:  # a child stops at its first failing fold: name what did not finish, not the whole share
        unfinished = [k for g in failed for k in g if not (fold_dir(run_dir, k) / "summary.json").is_file()]
        done = [k for g in failed for k in g if k not in unfinished]
        raise KaggleCMRError(f"{run_dir}: fold(s) {', '.join(map(str, unfinished))} did not finish (see the output "
                             f"above)" + (f"; fold(s) {', '.join(map(str, done))} of the same child finished" if done
                                          else "") + "; rerun the command to resume them")
    results = []
    for k in folds:
        if not (fold_dir(run_dir, k) / "summary.json").is_file():  # its child skipped it: locked
            print(f"fold {k}: skipped (another trainer holds it, see above)", flush=True)
            results.append(FoldResult(k, fold_dir(run_dir, k), float("nan"), 0, skipped=True, locked_by="another trainer"))
            continue
        summary = json.loads((fold_dir(run_dir, k) / "summary.json").read_text())
        results.append(FoldResult(k, fold_dir(run_dir, k), summary["best_score"], summary["best_epoch"]))
        print(f"fold {k}: best {title} {summary['best_score']:.4f} at epoch {summary['best_epoch']}", flush=True)
    return results
