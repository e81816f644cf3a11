"""Checkpoint files of a fold: ``best.safetensors`` (weights + config metadata of the best validation
epoch), ``last.safetensors`` (the last epoch), ``swa.safetensors`` (with ``train.swa_epochs``) and
``last.pt`` (full training state for exact resume, loaded with ``weights_only=True``).

:func:`model_file` names the one a fold keeps for ensembles (``train.select``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kagglecmr.cfg.config import Config
from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.io import atomic_path

MODEL_FILES = {"best": "best.safetensors", "last": "last.safetensors", "swa": "swa.safetensors"}


def check_select(select: str | None) -> None:
    """A ``--select`` name must be one of :data:`MODEL_FILES` (``None``: each fold's ``train.select``)."""
    if select is not None and select not in MODEL_FILES:
        raise KaggleCMRError(f"--select {select}: expected {', '.join(MODEL_FILES)}")


def model_file(fold_dir: Path, select: str | None = None) -> Path:
    """The checkpoint a finished fold keeps for ensembles: ``train.select`` of its ``summary.json``
    (``best`` for folds trained before the option existed), or ``select`` (best, last, swa) when given."""
    fold_dir = Path(fold_dir)
    if select is not None:
        check_select(select)
        return fold_dir / MODEL_FILES[select]
    select = "best"
    if (fold_dir / "summary.json").is_file():
        try:
            select = json.loads((fold_dir / "summary.json").read_text()).get("select", "best")
        except json.JSONDecodeError:
            raise KaggleCMRError(f"{fold_dir / 'summary.json'}: not valid JSON") from None
    return fold_dir / MODEL_FILES.get(select, MODEL_FILES["best"])


def selected_model_file(fold_dir: Path, select: str | None, run: Path) -> Path:
    """:func:`model_file` of a finished fold, which must exist: a ``--select`` the fold never saved (``swa``
    without ``train.swa_epochs``) is a one-line error naming the run and fold."""
    path = model_file(fold_dir, select)
    if not path.is_file():
        raise KaggleCMRError(f"{run}: {Path(fold_dir).name} has no {path.name} (--select {select}: "
                             f"{'trained without train.swa_epochs' if select == 'swa' else 'not saved'})")
    return path


def save_best(path: Path, model: torch.nn.Module, cfg: Config, epoch: int, score: float,
              dataset: dict | None = None) -> None:
    """Model weights as safetensors, with the config, epoch and dataset description in its metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(cfg.to_dict()), "epoch": str(epoch), "score": repr(float(score))}
    if dataset is not None:
        meta["dataset"] = json.dumps(dataset)
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
