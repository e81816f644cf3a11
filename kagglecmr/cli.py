"""Command line: parses options and calls library functions, nothing else.

Every :class:`~kagglecmr.utils.errors.KaggleCMRError` becomes ``error: <message>`` on stderr and exit
code 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import typer

from kagglecmr.utils.errors import KaggleCMRError

from . import api

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="k-fold segmentation ensembles for Kaggle-style 2D segmentation competitions.",
)


@app.callback()
def _options(
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="Where decoded splits are cached as arrays on "
                                         "disk, read a batch at a time (default $KAGGLECMR_CACHE, else ~/.cache/kagglecmr; off: no cache)."),
) -> None:
    """Options of every command (before the command's name)."""
    api.set_cache_dir(cache_dir)


@app.command("demo-data")
def demo_data(
    out: Path = typer.Argument(..., help="Folder to create (train/, val/, test/ inside)."),
    n_train: int = typer.Option(60, "--n-train", help="Labelled training images."),
    n_val: int = typer.Option(12, "--n-val", help="Labelled validation images."),
    n_test: int = typer.Option(24, "--n-test", help="Unlabelled test images."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same bytes)."),
    size: int = typer.Option(96, "--size", help="Image side in pixels."),
    force: bool = typer.Option(False, "--force", help="Replace an existing dataset at OUT."),
    kind: str = typer.Option("cmr", "--kind", help="cmr: CMR-like phantoms, labels 0..3; sparse: about half the "
                             "slices without a heart (every class empty), for empty-mask gating (ensemble --gate); "
                             "multilabel: overlapping shapes, one mask file per class, with a dataset.yaml "
                             "(task: multilabel)."),
) -> None:
    """Write a synthetic CMR-like dataset (phantoms, labels 0..3) in the competition layout."""
    api.demo_data(out, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, size=size, force=force, kind=kind)


@app.command("make-folds")
def make_folds(
    data: Path = typer.Option(Path("data"), "--data", help="Dataset: a folder (train/image, train/mask, ...) or a dataset .yaml file."),
    n_folds: int = typer.Option(5, "--n-folds", help="Number of folds."),
    seed: int = typer.Option(42, "--seed", help="Random seed."),
    out: Path = typer.Option(Path("folds/folds.csv"), "--out", help="Folds CSV to write."),
    no_groups: bool = typer.Option(False, "--no-groups", help="No groups (neither the dataset's group regex nor "
                                   "the near-duplicate guard)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing folds file."),
    config: str | None = typer.Option(None, "--config", help="Config (for image size / classes)."),
    allow_unbalanced: bool = typer.Option(False, "--allow-unbalanced", help="Write the folds (with a warning) even "
                                          "when a fold's size is off the mean by more than 25%, a fold misses a "
                                          "class, or a group is larger than a fold may hold."),
) -> None:
    """Stratified, grouped, deterministic k folds over train+val; refuses unbalanced folds."""
    api.make_folds(data, n_folds=n_folds, seed=seed, out=out, groups=not no_groups, force=force, config=config,
                   allow_unbalanced=allow_unbalanced)


@app.command("score")
def score(
    submission: Path = typer.Argument(..., help="Submission CSV (id,encoding)."),
    truth: Path | None = typer.Option(None, "--truth", help="Mask folder or solution CSV."),
    data: Path = typer.Option(Path("data"), "--data", help="Dataset (folder or .yaml) whose masks are the truth "
                              "and whose submission format the CSV is in."),
    split: str | None = typer.Option(None, "--split", help="Score against this split's masks (e.g. test); "
                                     "default: the labelled train/val masks of the submission's images."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Score a submission exactly as the leaderboard does (the dataset's metric; mean Dice over rows by default),
    plus Dice, IoU and pixel accuracy."""
    api.score(submission, truth=truth, data=data, split=split, as_json=as_json)


@app.command("encode")
def encode(
    mask_dir: Path = typer.Argument(..., help="Folder of PNG label masks (cmrN_mask.png or cmrN.png)."),
    out: Path = typer.Option(Path("submission.csv"), "--out", help="CSV to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing CSV."),
    num_classes: int = typer.Option(4, "--num-classes", help="Classes including background."),
    data: Path | None = typer.Option(None, "--data", help="Dataset (.yaml): its submission format and mask values "
                                     "(masks named like its mask pattern or <id>_mask.png / <id>.png)."),
) -> None:
    """Convert PNG label masks to a validated submission CSV (the course's converter)."""
    api.encode(mask_dir, out=out, force=force, num_classes=num_classes, data=data)


SelectOpt = typer.Option(None, "--select", help="Checkpoint of every fold: best, last or swa (default: each "
                         "fold's train.select); last/swa give an honest OOF.")
ConfigOpt = typer.Option(None, "--config", "-c", help="Config path or shipped name (default, demo, offline, warwick, camvid); "
                         "default: the dataset file's recipe, else default.")
SetOpt = typer.Option(None, "--set", help="Override a config key: --set train.lr=3e-4 (repeatable).")


@app.command("train")
def train(
    fold: str = typer.Option(..., "--fold", "-f", help="0, 0..4, 0,2,4 or all (full fit)."),
    config: str | None = ConfigOpt,
    data: Path = typer.Option(Path("data"), "--data", help="Dataset: a folder (train/image, train/mask, ...) or a dataset .yaml file."),
    folds: Path = typer.Option(Path("folds/folds.csv"), "--folds", help="Folds CSV from make-folds."),
    name: str | None = typer.Option(None, "--name", help="Run name (default: the config's name)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where runs are written."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override train.epochs."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Override train.batch_size."),
    lr: float | None = typer.Option(None, "--lr", help="Override train.lr."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    overrides: list[str] | None = SetOpt,
    force: bool = typer.Option(False, "--force", help="Retrain folds that already finished."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="One log line per epoch, no progress bar."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1,
                             help="Folds trained at once (processes; round-robin over several GPUs)."),
    executor: str = typer.Option("local", "--executor", help="local (this machine's processes) or ray."),
    ray_address: str | None = typer.Option(None, "--ray-address",
                                           help="Ray cluster to use (default: start Ray locally)."),
    seeds: str | None = typer.Option(None, "--seeds", help="Train once per seed as runs NAME-s<seed>: 42,43,44."),
    pseudo: Path | None = typer.Option(None, "--pseudo", help="Pseudo-label folder (kagglecmr pseudo-label)."),
    pseudo_weight: float | None = typer.Option(None, "--pseudo-weight", help="Loss weight of pseudo images."),
    pseudo_ratio: float | None = typer.Option(None, "--pseudo-ratio", help="Share of each batch from pseudo images."),
) -> None:
    """Train folds: best checkpoint by the leaderboard metric, resume, out-of-fold predictions.
    Without --config: the dataset file's recipe, else default."""
    api.train(fold, config=config, data=data, folds=folds, name=name, runs_dir=runs_dir, epochs=epochs,
              batch_size=batch_size, lr=lr, device=device, overrides=overrides, force=force, quiet=quiet, jobs=jobs,
              executor=executor, ray_address=ray_address, pseudo=pseudo, pseudo_weight=pseudo_weight,
              pseudo_ratio=pseudo_ratio, seeds=seeds)


@app.command("pseudo-label")
def pseudo_label(
    runs: list[Path] = typer.Option(..., "--runs", help="Teacher run folders (repeatable; one folds file)."),
    data: Path = typer.Option(Path("data"), "--data", help="Dataset root."),
    split: str = typer.Option("test", "--split", help="Unlabelled split to label (test)."),
    out: Path | None = typer.Option(None, "--out", help="Folder to write (default pseudo/<runs>-<split>)."),
    confidence: float = typer.Option(0.9, "--confidence", help="Pixels below this ensemble probability: 255."),
    tta: bool = typer.Option(False, "--tta", help="Flip TTA (the teachers' infer.tta)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", help="Replace an existing folder."),
    select: str | None = SelectOpt,
) -> None:
    """Pseudo masks of an unlabelled split: one set per fold from that fold's teachers, one from all."""
    api.pseudo_label(runs, data=data, split=split, out=out, confidence=confidence, tta=tta, force=force,
                     device=device, select=select)


@app.command("ensemble")
def ensemble(
    runs: list[Path] | None = typer.Option(None, "--runs", help="Run folders (repeatable; default: latest)."),
    weights: list[str] | None = typer.Option(None, "--weights",
                                             help="One weight per --runs (repeatable), or 'auto' (fitted on OOF)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where to look for the latest run."),
    data: Path = typer.Option(Path("data"), "--data", help="Dataset: a folder (train/image, train/mask, ...) or a dataset .yaml file."),
    split: list[str] = typer.Option(["test"], "--split",
                                    help="test, val, train or oof (out-of-fold); several from one load: "
                                         "--split oof,test or repeat the option."),
    tta: bool = typer.Option(False, "--tta", help="Flip test-time augmentation (config infer.tta)."),
    tta_flips: str | None = typer.Option(None, "--tta-flips", help="Comma list, e.g. none,hflip."),
    out: Path | None = typer.Option(None, "--out", help="CSV (default submissions/<run>-<split>-<time>.csv)."),
    save_masks: Path | None = typer.Option(None, "--save-masks", help="Also write PNG masks (the dataset's own "
                                           "mask values, each image's own size) + contact sheet."),
    postprocess: str = typer.Option("auto", "--postprocess", help="auto (tuned on OOF), none, or a plan JSON."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per forward pass (default: config infer.*)."),
    full: bool = typer.Option(True, "--full/--no-full", help="Add the full-fit model (train --fold all) if any."),
    select: str | None = SelectOpt,
    gate: str | None = typer.Option(None, "--gate", help="Empty-mask gating tuned on OOF with --postprocess auto: "
                                    "triplet, head (the cls head's threshold), triplet,head or none (default: head "
                                    "when the runs have a cls head)."),
) -> None:
    """Average fold softmax (+ flip TTA), OOF-tuned postprocessing, leaderboard-ready CSV."""
    splits = [s.strip() for item in split for s in item.split(",") if s.strip()]
    if weights and [w.lower() for w in weights] == ["auto"]:
        weights = "auto"
    elif weights:
        try:
            weights = [float(w) for w in weights]
        except ValueError:
            raise KaggleCMRError(f"--weights {' '.join(weights)}: expected numbers (one per --runs) or auto") from None
    api.ensemble(runs, weights=weights, runs_dir=runs_dir, data=data, split=splits[0] if len(splits) == 1 else splits,
                 tta=tta, tta_flips=_flips(tta_flips), out=out, save_masks=save_masks, postprocess=postprocess,
                 device=device, batch_size=batch_size, full=full, select=select, gate=gate)


def _flips(text: str | None) -> list[str] | None:
    return [f.strip() for f in text.split(",") if f.strip()] or None if text else None


RunsOpt = typer.Option(None, "--runs", help="Run folders (repeatable; default: the latest under --runs-dir).")
WeightsOpt = typer.Option(None, "--weights", help="One weight per --runs (repeatable).")
TtaOpt = typer.Option(False, "--tta", help="Flip test-time augmentation (config infer.tta).")
FlipsOpt = typer.Option(None, "--tta-flips", help="Comma list, e.g. none,hflip.")
FullOpt = typer.Option(True, "--full/--no-full", help="Add the full-fit model (train --fold all) if any.")


@app.command("predict")
def predict(
    images: list[Path] = typer.Argument(..., help="PNG, TIFF or JPEG files and/or folders of them (any size, grey or colour)."),
    out: Path = typer.Option(..., "--out", help="Folder for <name>.png masks (and overlays)."),
    runs: list[Path] | None = typer.Option(None, "--runs", help="Run folders (repeatable; default: the latest "
                                           "under --runs-dir), or one file written by export."),
    weights: list[float] | None = WeightsOpt,
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where to look for the latest run."),
    tta: bool = TtaOpt,
    tta_flips: str | None = FlipsOpt,
    overlay: bool = typer.Option(False, "--overlay", help="Also write <name>_overlay.png (class outlines)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing masks."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per forward pass."),
    full: bool = FullOpt,
    select: str | None = SelectOpt,
    postprocess: str = typer.Option("none", "--postprocess", help="none, auto (the run's postprocess.json written by "
                                    "ensemble: component rules and empty-mask gates) or a plan JSON."),
) -> None:
    """Masks for any PNG, TIFF or JPEG images, in the dataset's own mask values, at each image's own size."""
    api.predict(images, runs=runs, out=out, tta=tta, tta_flips=_flips(tta_flips), weights=weights, overlay=overlay,
                force=force, device=device, batch_size=batch_size, full=full, runs_dir=runs_dir, select=select,
                postprocess=postprocess)


@app.command("export")
def export(
    out: Path = typer.Option(..., "--out", help="File to write (.onnx or .pt); FILE.json beside it."),
    fmt: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
    runs: list[Path] | None = RunsOpt,
    weights: list[float] | None = WeightsOpt,
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where to look for the latest run."),
    tta: bool = TtaOpt,
    tta_flips: str | None = FlipsOpt,
    data: Path | None = typer.Option(None, "--data", help="Dataset whose labelled images check the file."),
    full: bool = FullOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    select: str | None = SelectOpt,
) -> None:
    """The whole ensemble (folds x runs x TTA, softmax mean) as one ONNX/TorchScript file, checked on load."""
    api.export(runs, out=out, format=fmt, tta=tta, tta_flips=_flips(tta_flips), weights=weights, data=data,
               full=full, force=force, runs_dir=runs_dir, select=select)


@app.command("runs")
def runs(
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Folder holding the run folders."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON array (one object per run)."),
) -> None:
    """Local leaderboard: every run with its config changes, folds, OOF scores, size and timings."""
    api.runs(runs_dir, as_json=as_json)


@app.command("report")
def report(
    run: Path = typer.Argument(..., help="Run folder (runs/<name>)."),
    data: Path | None = typer.Option(None, "--data", help="Dataset the run trained on (for the worst OOF images)."),
    worst: int = typer.Option(12, "--worst", help="How many of the worst out-of-fold images to show."),
) -> None:
    """Write <run>/report.html: one self-contained page (plots embedded) about the run."""
    api.report(run, data=data, worst=worst)


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
