"""Shared fixtures: a tiny demo dataset, its folds and ONE trained tiny 5-fold run (session scoped).

The run is trained once per test session through the library (``kagglecmr.engine.orchestrate.run_train``) with a
2-epoch scratch Unet on 25 labelled 96x96 phantoms; train/ensemble tests copy it before changing it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything can import huggingface_hub
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
if "KAGGLECMR_CACHE" not in os.environ:  # the decoded-array cache of this test session, not the user's
    import tempfile

    os.environ["KAGGLECMR_CACHE"] = tempfile.mkdtemp(prefix="kagglecmr-test-cache-")

import contextlib
import hashlib
import io
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TINY_YAML = """\
seed: 7
data: {size: 96, in_channels: 1, num_classes: 4}
model:
  arch: Unet
  encoder: resnet18
  weights: none
  params: {encoder_depth: 3, decoder_channels: [16, 8, 4]}
loss: {name: dice_ce}
augment: {hflip: 0.5, vflip: 0.5, affine: 0.5, rotate: 15, intensity: 0.3, gamma: 0.3}
train:
  epochs: 2
  batch_size: 8
  lr: 0.003
  warmup_epochs: 0
  amp: none
  val_batch_size: 16
infer: {tta: [none, hflip, vflip, hvflip]}
"""
RUN_NAME = "tiny"  # the config's file stem
N_TRAIN, N_VAL, N_TEST = 20, 5, 6
N_FOLDS = 5


@dataclass(frozen=True)
class Project:
    """Paths of the session's shared, read-only material."""

    root: Path
    config: Path  # tiny.yaml
    data: Path  # demo dataset (train/, val/, test/)
    folds: Path  # folds CSV
    runs_dir: Path  # holds RUN_NAME, trained on every fold
    run: Path  # runs_dir / RUN_NAME


# ------------------------------------------------------------------------------------ helpers
def run_cli(*args, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m kagglecmr ARGS`` in a subprocess (inherits the offline environment)."""
    return subprocess.run([sys.executable, "-m", "kagglecmr", *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def run_main(*args, cwd=None) -> subprocess.CompletedProcess:
    """The same command through ``kagglecmr.cli.main`` in this process (no interpreter start-up, no
    torch import: seconds saved per call).  Output and exit code as from :func:`run_cli`; an
    exception ``main`` lets through (a traceback in a real process) fails the calling test."""
    from kagglecmr.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd, code = sys.argv, os.getcwd(), 0
    sys.argv = ["kagglecmr", *map(str, args)]
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def check_cli_error(proc: subprocess.CompletedProcess, *needles) -> str:
    """Exit code 2, stderr exactly one line ``error: ...`` containing ``needles``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return lines[0]


def tree_snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """``{relative path: (sha256, mtime_ns)}`` of every file under ``root`` (empty if it does not exist)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy_run(src: Path, dst: Path, *, slim: bool = False) -> Path:
    """Copy a run folder (timestamps kept).  ``slim`` leaves out ``last.pt`` and plots (what the
    ensemble and the fold bookkeeping never read), which keeps copies small and quick."""
    skip = shutil.ignore_patterns("last.pt", "curves.png") if slim else None
    shutil.copytree(src, dst, ignore=skip)
    return dst


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def main_cli():
    return run_main


@pytest.fixture(scope="session")
def assert_cli_error():
    return check_cli_error


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Project:
    """Demo data, folds and a 2-epoch tiny run trained on all 5 folds (the expensive part, done once)."""
    from kagglecmr.cfg.config import load_config
    from kagglecmr.data.demo import make_demo_dataset
    from kagglecmr.data.folds import run_make_folds
    from kagglecmr.engine.orchestrate import run_train

    root = tmp_path_factory.mktemp("project")
    config = root / f"{RUN_NAME}.yaml"
    config.write_text(TINY_YAML)
    data = root / "data"
    make_demo_dataset(data, n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, seed=0)
    folds = root / "folds.csv"
    run_make_folds(data, n_folds=N_FOLDS, seed=42, out=folds)
    runs_dir = root / "runs"
    run_train(load_config(config), fold_spec="0..4", data_root=data, folds_path=folds, name=None,
              runs_dir=runs_dir, device="cpu", force=False, quiet=True)
    return Project(root=root, config=config, data=data, folds=folds, runs_dir=runs_dir, run=runs_dir / RUN_NAME)


@pytest.fixture(scope="session")
def tiny_cfg(project):
    from kagglecmr.cfg.config import load_config

    return load_config(project.config)


@pytest.fixture(scope="session")
def labelled(project, tiny_cfg):
    """Every labelled image of the demo dataset (train + val), decoded as training reads it."""
    from kagglecmr.data.dataset import prepare

    return prepare(tiny_cfg, project.data, quiet=True)[2]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and spinning OpenMP workers are slow on a busy 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def truth_masks(project, ids):
    """The demo dataset's true masks of ``ids`` (train/ or val/), stacked in that order."""
    import numpy as np

    from kagglecmr.data.loader import read_mask

    out = []
    for i in ids:
        split = "val" if (project.data / "val" / "mask" / f"{i}_mask.png").is_file() else "train"
        out.append(read_mask(project.data / split / "mask" / f"{i}_mask.png"))
    return np.stack(out)


def course_rle(x):
    """The course tutorial's converter, verbatim in spirit: x.T.flatten(), 1-based runs (the CMR encoding)."""
    import numpy as np

    dots = np.where(x.T.flatten() == 1)[0]
    run_lengths: list[int] = []
    prev = -2
    for b in dots:
        if b > prev + 1:
            run_lengths.extend((b + 1, 0))
        run_lengths[-1] += 1
        prev = b
    return " ".join(map(str, run_lengths))
