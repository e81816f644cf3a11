"""Where folds run: device assignment for ``--jobs`` and the Ray executor (``train --executor ray``).

``--executor local`` (the default) trains folds in this process or in ``--jobs`` child processes
(:mod:`kagglecmr.engine.orchestrate`).  ``--executor ray`` makes each (run, fold) a Ray task: one GPU per task when
the device is CUDA, else CPUs split like ``--jobs`` does (threads per task = cores // tasks at once).
Without ``--ray-address`` Ray starts locally on this machine (a small object store, no dashboard) and
stops when training ends; with an address (``ray://host:10001`` or ``auto``) the tasks run on that
cluster, whose workers need kagglecmr installed and the data and runs folders at the same paths.

The labelled images and the folds go to the object store once; every task trains its fold with
:func:`kagglecmr.engine.orchestrate.train_locked`, so run folders, metrics and OOF files are the ones the local
executor writes (same seeds, same threads per fold -> same CPU metrics), finished folds are skipped,
unfinished ones resume from ``last.pt``, and a fold another trainer holds is skipped.  Ray's worker
processes are kept between tasks (``max_calls=0``): a worker that trains several folds keeps its
CUDA context and cuDNN handles warm.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
from pathlib import Path

from kagglecmr.cfg.config import Config
from kagglecmr.data.dataset import described_metric
from kagglecmr.engine.rundir import FoldResult, fold_dir, report_fold
from kagglecmr.engine.trainer import train_locked
from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.runtime import cpu_count, resolve_device, setup_threads

RAY_INSTALL = "pip install 'kagglecmr[ray]'"
OBJECT_STORE_MIN = 100 * 2**20  # bytes; Ray's own minimum is 75 MiB
RAY_UNIT = 10_000  # Ray counts resources in fixed point, 1e-4 units


def assign_devices(folds: list, device: str | None, n_gpus: int) -> list[str]:
    """The device of each fold for ``--jobs``: round-robin ``cuda:0..k-1`` when ``device`` is ``auto`` or
    ``cuda`` and ``k = n_gpus > 1`` GPUs are visible; otherwise every fold on the one device asked for."""
    spec = (device or "auto").strip().lower()
    if spec in ("auto", "cuda") and n_gpus > 1:
        return [f"cuda:{i % n_gpus}" for i in range(len(folds))]
    if spec == "auto":
        spec = "cuda" if n_gpus > 0 else "cpu"
    return [spec] * len(folds)


def import_ray():
    """``ray``, or a one-line error saying how to install the optional extra."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # each fold's epoch lines, not "[repeated 2x]" (read on import)
    try:
        import ray
    except ImportError:
        raise KaggleCMRError(f"--executor ray: Ray is not installed; {RAY_INSTALL}") from None
    return ray


def task_resources(device_type: str, n_folds: int, jobs: int, cpus: int, gpus: float) -> dict:
    """Ray resources, torch threads and tasks at once (``at_once``) of fold tasks.

    GPU: one GPU per task and one CPU; ``--jobs J`` on ``G < J`` GPUs puts ``ceil(J / G)`` tasks on a GPU
    (``1 / ceil(J / G)`` of a GPU each: a share that packs whole, where ``G / J`` may fit fewer tasks on a
    GPU than asked, e.g. 2/3 of a GPU fits once).  Threads = ``cpus // tasks that really run at once``.
    CPU: ``threads = cpus // tasks at once`` CPUs per task, tasks at once = ``--jobs`` or
    ``min(folds, cpus)``."""
    if device_type == "cuda":
        whole = int(gpus + 1e-9)
        if whole < 1:  # a cluster offering part of a GPU: the tasks share that part
            share, at_once = gpus / max(1, jobs), max(1, min(n_folds, jobs))
        else:
            per_gpu = math.ceil(jobs / whole) if jobs > whole else 1
            share, at_once = 1 / per_gpu, max(1, min(n_folds, whole * per_gpu))
        share = math.floor(share * RAY_UNIT + 1e-6) / RAY_UNIT  # Ray counts in 1e-4: 1/7 -> 0.1428, 7 fit
        return {"num_gpus": share, "num_cpus": 1, "threads": max(1, cpus // at_once), "at_once": at_once}
    at_once = max(1, min(n_folds, jobs if jobs > 1 else cpus))
    threads = max(1, cpus // at_once)
    return {"num_gpus": 0, "num_cpus": threads, "threads": threads, "at_once": max(1, min(n_folds, cpus // threads))}


def _fold_task(cfg: Config, data, folds_df, fold, run_dir: str, device: str, force: bool, threads: int,
               dataset: dict | None = None, env_extra: dict | None = None):
    """One fold in a Ray worker: ``(FoldResult, None)`` or ``(None, one-line error)``."""
    try:
        setup_threads(threads)
        res = train_locked(cfg, data, folds_df, fold, Path(run_dir), device=resolve_device(device), force=force,
                           quiet=True, skip_locked=True, dataset=dataset, env_extra=env_extra)
        return res, None
    except KaggleCMRError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a bug or a crash in training: traceback in the log, one line back
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        return None, f"{type(exc).__name__}: {first}"


def _start_ray(ray, address: str | None, device_type: str, data_bytes: int) -> bool:
    """Connect to ``address`` or start a local Ray; returns whether this call started it."""
    if ray.is_initialized():
        return False
    common = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **common)
        else:
            import torch

            n_gpus = torch.cuda.device_count() if device_type == "cuda" else 0
            ray.init(num_cpus=cpu_count(), num_gpus=n_gpus,
                     object_store_memory=max(OBJECT_STORE_MIN, 3 * data_bytes), **common)
    except Exception as exc:  # noqa: BLE001 - connection/start-up failures of any kind
        where = f"--ray-address {address}" if address else "--executor ray"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KaggleCMRError(f"{where}: cannot start Ray ({first})") from None
    return True


def train_ray(fold_cfgs: list[tuple[object, Config]], *, data, folds_df, run_dir: Path, device, force: bool,
              jobs: int = 1, address: str | None = None, dataset: dict | None = None,
              env_extra: dict | None = None) -> list[FoldResult]:
    """Train ``(fold, config)`` pairs as Ray tasks; results in fold order, folds reported as they end.
    ``env_extra`` goes into each fold's ``env.json`` (the run's folds file and its sha256)."""
    ray = import_ray()
    run_dir.mkdir(parents=True, exist_ok=True)
    data_bytes = int(data.images.nbytes + data.masks.nbytes)
    started = _start_ray(ray, address, device.type, data_bytes)
    try:
        res = ray.cluster_resources()
        cpus, gpus = int(res.get("CPU", 1)), float(res.get("GPU", 0))
        if device.type == "cuda" and gpus <= 0:  # the tasks would wait for a GPU forever
            raise KaggleCMRError("--executor ray: the device is CUDA but the Ray cluster has no GPU (--device cpu?)")
        r = task_resources(device.type, len(fold_cfgs), jobs, cpus, gpus)
        task = ray.remote(num_cpus=r["num_cpus"], num_gpus=r["num_gpus"], max_calls=0)(_fold_task)
        data_ref, folds_ref = ray.put(data), ray.put(folds_df)
        dev = "cuda" if device.type == "cuda" else str(device)  # Ray sets CUDA_VISIBLE_DEVICES per task
        print(f"ray: {cpus} CPUs, {gpus:g} GPUs | per fold: {r['num_cpus']} CPU(s), {r['num_gpus']:g} GPU(s), "
              f"{r['threads']} thread(s) | {r['at_once']} fold(s) at once", flush=True)
        refs = {task.remote(fcfg, data_ref, folds_ref, fold, str(run_dir), dev, force, r["threads"], dataset,
                            env_extra): fold
                for fold, fcfg in fold_cfgs}
        results, errors, pending = {}, [], list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            fold = refs[done[0]]
            try:
                out, err = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                out, err = None, f"Ray task failed ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]})"
            if err is not None:
                print(f"fold {fold}: failed: {err}", flush=True)
                errors.append(f"fold {fold} ({fold_dir(run_dir, fold)}): {err}")
                continue
            if out.locked_by:
                print(f"fold {fold}: skipped, {out.locked_by}", flush=True)
            elif out.skipped:
                print(f"fold {fold}: already finished ({out.out_dir}); --force retrains it", flush=True)
            report_fold(out, described_metric(dataset).title)
            results[fold] = out
    finally:
        if started:
            ray.shutdown()
    if errors:
        raise KaggleCMRError(f"{run_dir}: {len(errors)} Ray task(s) failed: " + " | ".join(errors))
    return [results[fold] for fold, _ in fold_cfgs]
