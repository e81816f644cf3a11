"""Command line: parses options and calls library functions, nothing else.

Every :class:`~kagglecmr.errors.KaggleCMRError` becomes ``error: <message>`` on stderr and exit
code 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import typer  # noqa: E402

from .errors import KaggleCMRError  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="k-fold segmentation ensembles for Kaggle-style PNG competitions (cardiac MR first).",
)


@app.command("demo-data")
def demo_data(
    out: Path = typer.Argument(..., help="Folder to create (train/, val/, test/ inside)."),
    n_train: int = typer.Option(60, "--n-train", help="Labelled training images."),
    n_val: int = typer.Option(12, "--n-val", help="Labelled validation images."),
    n_test: int = typer.Option(24, "--n-test", help="Unlabelled test images."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same bytes)."),
    size: int = typer.Option(96, "--size", help="Image side in pixels."),
    force: bool = typer.Option(False, "--force", help="Replace an existing dataset at OUT."),
) -> None:
    """Write a synthetic CMR-like dataset (phantoms, labels 0..3) in the competition layout."""
    from .demo import make_demo_dataset

    make_demo_dataset(out, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, size=size, force=force)


@app.command("make-folds")
def make_folds(
    data: Path = typer.Option(Path("data"), "--data", help="Dataset root (train/ and optional val/)."),
    n_folds: int = typer.Option(5, "--n-folds", help="Number of folds."),
    seed: int = typer.Option(42, "--seed", help="Random seed."),
    out: Path = typer.Option(Path("folds/folds.csv"), "--out", help="Folds CSV to write."),
    no_groups: bool = typer.Option(False, "--no-groups", help="Do not group near-duplicate images."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing folds file."),
    config: Optional[str] = typer.Option(None, "--config", help="Config (for image size / classes)."),
) -> None:
    """Stratified, grouped, deterministic k folds over train+val."""
    from .config import load_config
    from .folds import run_make_folds

    cfg = load_config(config) if config else None
    run_make_folds(data, n_folds=n_folds, seed=seed, out=out, groups=not no_groups, force=force,
                   spec=cfg.data.spec() if cfg else None)


@app.command("score")
def score(
    submission: Path = typer.Argument(..., help="Submission CSV (id,encoding)."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="Mask folder or solution CSV."),
    data: Path = typer.Option(Path("data"), "--data", help="Dataset root whose train/val masks are the truth."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Score a submission exactly as the leaderboard does (mean Dice over rows)."""
    from .score import run_score

    run_score(submission, truth=truth, data=data, as_json=as_json)


@app.command("encode")
def encode(
    mask_dir: Path = typer.Argument(..., help="Folder of PNG label masks (cmrN_mask.png or cmrN.png)."),
    out: Path = typer.Option(Path("submission.csv"), "--out", help="CSV to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing CSV."),
    num_classes: int = typer.Option(4, "--num-classes", help="Classes including background."),
) -> None:
    """Convert PNG label masks to a validated submission CSV (the course's converter)."""
    from .rle import run_encode

    run_encode(mask_dir, out=out, force=force, num_classes=num_classes)


@app.command("train")
def train() -> None:
    """Train folds (not implemented yet)."""
    raise KaggleCMRError("train: not implemented yet")


@app.command("ensemble")
def ensemble() -> None:
    """Ensemble folds into a submission (not implemented yet)."""
    raise KaggleCMRError("ensemble: not implemented yet")


def main() -> None:
    try:
        app()
    except KaggleCMRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
