"""The Python API: the CLI's verbs as functions for notebooks (``import kagglecmr as kc``).

Every ``kagglecmr`` command is a thin layer over exactly one function here, with the command's options
as keyword arguments; each returns a result object (scores as floats and dicts, probabilities as numpy
arrays, the paths it wrote) and raises the same :class:`~kagglecmr.utils.errors.KaggleCMRError` the CLI
prints as ``error: ...``.  Progress lines go to stdout as in the CLI (plain text when stdout is not a
terminal, e.g. in Jupyter or a log file).

Nothing heavy is imported here at module level: ``import kagglecmr`` stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd

    from kagglecmr.cfg.config import Config
    from kagglecmr.engine.exporter import ExportedModel
    from kagglecmr.engine.predictor import Predictor
    from kagglecmr.engine.rundir import FoldResult
    from kagglecmr.formats.metric import ScoreResult


# ------------------------------------------------------------------------------------- results
@dataclass
class DemoDataResult:
    path: Path
    summary: dict


@dataclass
class FoldsResult:
    path: Path
    folds: pd.DataFrame  # id, split, fold, group, ... one row per labelled image


@dataclass
class EncodeResult:
    path: Path
    rows: int


@dataclass
class TrainResult:
    run_dir: Path
    folds: list[FoldResult]
    oof: dict | None  # {"score", "per_class", "images", "rows"} once every fold has OOF predictions

    @property
    def score(self) -> float | None:
        """The run's out-of-fold score, the dataset's metric (None until every fold is trained)."""
        return None if self.oof is None else self.oof["score"]


@dataclass
class EnsembleResult:
    out: Path  # the submission CSV written
    ids: list[str]
    probs: np.ndarray | None  # float32 [N, K, H, W] averaged softmax (before postprocessing); None over 2 GB
    labels: np.ndarray | list  # uint8 [N, H, W] submitted masks (after postprocessing; a list when sizes differ)
    rows: int
    empty: dict[int, int]  # empty rows per class
    plan: dict | None  # postprocessing plan applied
    tta: list[str]
    runs: list[Path]
    score: float | None = None  # the dataset's metric (Dice by default) of ``labels`` when the split has masks (oof: honest)
    per_class: dict[str, float] = field(default_factory=dict)


@dataclass
class PredictResult:
    masks: list[Path]
    overlays: list[Path]
    labels: list[np.ndarray]  # class maps at each image's own size
    files: list[Path]


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    max_error: float
    checked_on: str
    info: dict


# ----------------------------------------------------------------------------------- functions
def demo_data(out: str | Path, *, n_train: int = 60, n_val: int = 12, n_test: int = 24, seed: int = 0,
              size: int = 96, force: bool = False, kind: str = "cmr") -> DemoDataResult:
    """Synthetic CMR-like dataset in the competition layout (``kagglecmr demo-data``); ``kind="sparse"``: about
    half the slices without a heart (every class empty), for empty-mask gating; ``kind="multilabel"``: overlapping
    shapes, one mask file per class, with its ``dataset.yaml`` (``task: multilabel``)."""
    from kagglecmr.data.demo import make_demo_dataset
    from kagglecmr.data.demo_multilabel import make_multilabel_demo
    from kagglecmr.utils.errors import KaggleCMRError

    if kind not in ("cmr", "sparse", "multilabel"):
        raise KaggleCMRError(f"--kind {kind}: expected one of cmr, sparse, multilabel")
    if kind == "multilabel":
        summary = make_multilabel_demo(out, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, size=size,
                                       force=force)
    else:
        summary = make_demo_dataset(out, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, size=size,
                                    force=force, kind=kind)
    return DemoDataResult(Path(out), summary)


def make_folds(data: str | Path = "data", *, n_folds: int = 5, seed: int = 42, out: str | Path = "folds/folds.csv",
               groups: bool = True, force: bool = False, config: str | Path | Config | None = None,
               allow_unbalanced: bool = False) -> FoldsResult:
    """Stratified, grouped, deterministic folds over train+val (``kagglecmr make-folds``).  Unbalanced folds
    (a size off the mean by more than 25 %, a missing class, a group larger than a fold may hold) raise
    ``KaggleCMRError`` and write nothing, unless ``allow_unbalanced`` (then a warning is printed)."""
    from kagglecmr.data.folds import run_make_folds

    cfg = _load_config(config) if config is not None else None
    df = run_make_folds(Path(data), n_folds=n_folds, seed=seed, out=Path(out), groups=groups, force=force, config=cfg,
                        allow_unbalanced=allow_unbalanced)
    return FoldsResult(Path(out), df)


def score(submission: str | Path, *, truth: str | Path | None = None, data: str | Path = "data",
          split: str | None = None, as_json: bool = False) -> ScoreResult:
    """Leaderboard score of a submission CSV (``kagglecmr score``): ``.score``, ``.per_class``, ``.worst``.

    The truth is ``data``'s masks (a folder or a dataset file, read as training reads it: its mask values,
    classes and submission format), of ``split`` or by default the labelled masks of the submission's
    images; or ``truth``: a mask folder or a solution CSV (CMR format unless ``data`` is a dataset)."""
    from kagglecmr.engine.evaluator import run_score, run_score_dataset

    data = Path(data)
    if truth is None or split is not None or data.exists():
        return run_score_dataset(Path(submission), data=data, split=split, truth=truth, as_json=as_json)
    return run_score(Path(submission), truth=Path(truth), as_json=as_json)


def encode(mask_dir: str | Path, *, out: str | Path = "submission.csv", force: bool = False,
           num_classes: int = 4, data: str | Path | None = None) -> EncodeResult:
    """PNG label masks -> validated submission CSV (``kagglecmr encode``); ``data``: a dataset file's format."""
    from kagglecmr.engine.evaluator import run_encode

    if data is not None:
        from kagglecmr.engine.evaluator import run_encode_dataset

        rows = run_encode_dataset(Path(mask_dir), data=Path(data), out=Path(out), force=force)
        return EncodeResult(Path(out), rows)
    rows = run_encode(Path(mask_dir), out=Path(out), force=force, num_classes=num_classes)
    return EncodeResult(Path(out), rows)


def _load_config(config, overrides: list[str] | None = None, **flags) -> Config:
    """A config from a name, path, dict or Config, with ``--set``-style overrides and flags
    (``{"train.epochs": 3}``; None values are ignored)."""
    from kagglecmr.cfg.config import Config, apply_overrides, load_config

    sets = list(overrides or []) + [f"{key}={value}" for key, value in flags.items() if value is not None]
    if isinstance(config, Config):
        config = config.to_dict()
    if isinstance(config, dict):
        import copy

        from pydantic import ValidationError

        from kagglecmr.cfg.config import _format_validation_error
        from kagglecmr.utils.errors import ConfigError

        try:
            return Config.model_validate(apply_overrides(copy.deepcopy(config), sets))
        except ValidationError as err:
            raise ConfigError(_format_validation_error("config", err)) from None
    return load_config(config or "default", sets)


def train(fold: str | int = "0..4", *, config: str | Path | Config | dict | None = None, data: str | Path = "data",
          folds: str | Path = "folds/folds.csv", name: str | None = None, runs_dir: str | Path = "runs",
          epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
          device: str | None = None, overrides: list[str] | None = None, force: bool = False, quiet: bool = False,
          jobs: int = 1, executor: str = "local", ray_address: str | None = None, pseudo: str | Path | None = None,
          pseudo_weight: float | None = None, pseudo_ratio: float | None = None,
          seeds: str | list[int] | None = None) -> TrainResult:
    """Train folds (``kagglecmr train``): ``fold`` is ``0``, ``"0..4"``, ``"0,2,4"`` or ``"all"``;
    ``overrides`` are ``--set`` strings (``["train.lr=3e-4"]``); ``pseudo`` is a ``pseudo-label`` folder;
    ``seeds`` (``"42,43"`` or a list) trains runs ``<name>-s42``, ``<name>-s43`` (the result is the last one's)."""
    from kagglecmr.engine.orchestrate import run_train

    if config is None:
        from kagglecmr.data.dataset import recipe_for

        config = recipe_for(data)  # the dataset file's recipe, else default
    cfg = _load_config(config, overrides, **{"train.epochs": epochs, "train.batch_size": batch_size, "train.lr": lr,
                                             "train.pseudo.dir": None if pseudo is None else str(pseudo),
                                             "train.pseudo.weight": pseudo_weight, "train.pseudo.ratio": pseudo_ratio})
    if seeds is not None and not isinstance(seeds, str):
        seeds = ",".join(str(s) for s in seeds)
    results = run_train(cfg, fold_spec=str(fold), data_root=Path(data), folds_path=Path(folds), name=name,
                        runs_dir=Path(runs_dir), device=device, force=force, quiet=quiet, jobs=jobs,
                        executor=executor, ray_address=ray_address, seeds=seeds)
    run_dir = Path(runs_dir) / (name or cfg.name or "run")
    if seeds:
        from kagglecmr.engine.orchestrate import seed_runs

        run_dir = Path(runs_dir) / seed_runs(cfg, seeds, name)[-1][1]
    oof_path = run_dir / "oof.json"
    import json

    oof = json.loads(oof_path.read_text()) if oof_path.is_file() else None
    return TrainResult(run_dir, results, oof)


def ensemble(runs: list[str | Path] | str | Path | None = None, *, weights: list[float] | str | None = None,
             runs_dir: str | Path = "runs", data: str | Path = "data", split: str | list[str] = "test",
             tta: bool = False, tta_flips: list[str] | None = None, out: str | Path | None = None,
             save_masks: str | Path | None = None, postprocess: str = "auto", device: str = "auto",
             batch_size: int | None = None, full: bool = True,
             select: str | None = None, gate: str | None = None) -> EnsembleResult | dict[str, EnsembleResult]:
    """Fold-averaged softmax (+ TTA, run weights), OOF-tuned postprocessing, submission CSV (``kagglecmr ensemble``);
    with a ``task: multilabel`` dataset the sigmoids per class and OOF-tuned per-class thresholds.
    ``select`` (best, last, swa) overrides which checkpoint every fold contributes.  ``gate``: empty-mask gating
    tuned on OOF with the postprocessing (``triplet``, ``head``, ``triplet,head`` or ``none``; default: the
    head's threshold when the runs have a cls head; not with ``task: multilabel``).
    ``split`` is one name (-> an :class:`EnsembleResult`) or a list (-> ``{split: EnsembleResult}``, one load)."""
    from kagglecmr.data.dataset import dataset_task
    from kagglecmr.engine.ensemble_multilabel import run_ensemble_multilabel
    from kagglecmr.engine.ensembler import run_ensemble
    from kagglecmr.utils.errors import KaggleCMRError

    paths = None if runs is None else [Path(runs)] if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    multilabel = dataset_task(data) == "multilabel"
    if multilabel and gate not in (None, "none"):
        raise KaggleCMRError(f"--gate {gate}: empty-mask gating is not supported with task: multilabel yet")
    kwargs = {} if multilabel else {"gate": gate}
    run = run_ensemble_multilabel if multilabel else run_ensemble  # sigmoid per class
    res = run(runs=paths or None, runs_dir=Path(runs_dir), data_root=Path(data), split=split,
              tta=tta or bool(tta_flips), tta_flips=list(tta_flips) if tta_flips else None,
              out=None if out is None else Path(out), save_masks=None if save_masks is None else Path(save_masks),
              postprocess=postprocess, weights=weights, device=device, batch_size=batch_size, with_full=full,
              select=select, **kwargs)
    if isinstance(split, str):
        return _ensemble_result(res)
    return {s: _ensemble_result(r) for s, r in res.items()}


def _ensemble_result(res: dict) -> EnsembleResult:
    import numpy as np

    labels = res["labels"]  # each image's own size
    same = len({m.shape for m in labels}) <= 1
    labels = np.stack(labels) if same and len(labels) else labels
    result = EnsembleResult(Path(res["out"]), res["ids"], res["probs"], labels, res["rows"], res["empty"],
                            res["plan"], list(res["tta"]), [Path(r) for r in res["runs"]])
    if res["truth"] is not None and same and labels.shape == res["truth"].shape:
        from kagglecmr.formats.multilabel import task_table

        table = task_table(res["labels"], res["truth"], res["num_classes"], bool(res.get("multilabel")),
                           res.get("metric"))  # the dataset's metric; probs may be None (a large split)
        result.score = table.score
        result.per_class = {str(k): float(v) for k, v in zip(table.classes, table.per_class)}
    return result


def load_ensemble(runs: list[str | Path] | str | Path | None = None, *, tta: bool = False,
                  tta_flips: list[str] | None = None, weights: list[float] | None = None, device: str = "auto",
                  batch_size: int | None = None, full: bool = True, runs_dir: str | Path = "runs",
                  select: str | None = None, postprocess: str | Path | None = None) -> Predictor:
    """The ensemble of ``runs`` ready for numpy images of any size: ``.predict_proba(images)`` (float32
    ``[N, K, H, W]``, a list when sizes differ), ``.predict(images)`` (class maps), ``.to_raw(labels)``.
    ``select`` (best, last, swa): that checkpoint of every fold instead of its ``train.select``.
    ``postprocess``: the plan ``.predict`` applies (component rules and empty-mask gates): ``"auto"`` (the run's
    own ``postprocess.json``, written by :func:`ensemble`) or a plan file; None (default): the plain argmax.
    ``runs`` may also be one ``.onnx``/``.pt`` file written by :func:`export` (onnxruntime / TorchScript)."""
    from kagglecmr.engine.predictor import load_ensemble as _load
    from kagglecmr.engine.predictor import read_plan

    one = runs[0] if isinstance(runs, (list, tuple)) and len(runs) == 1 else runs
    if isinstance(one, (str, Path)) and Path(one).suffix.lower() in (".onnx", ".pt"):
        from kagglecmr.engine.exporter import ExportPredictor

        if tta or tta_flips or weights or select:
            print(f"note: {one} has its models, TTA and weights built in; tta/tta_flips/weights/select are ignored",
                  flush=True)
        pred = ExportPredictor.load(one)
        pred.plan = read_plan(None if postprocess is None else str(postprocess), [Path(one)], pred.num_classes)
        return pred
    return _load(runs, tta=tta, tta_flips=tta_flips, weights=weights, device=device, batch_size=batch_size,
                 full=full, runs_dir=Path(runs_dir), select=select,
                 postprocess=None if postprocess is None else str(postprocess))


def predict(images: list[str | Path] | str | Path, *, runs: list[str | Path] | str | Path | None = None,
            out: str | Path, tta: bool = False, tta_flips: list[str] | None = None, weights: list[float] | None = None,
            overlay: bool = False, force: bool = False, device: str = "auto", batch_size: int | None = None,
            full: bool = True, runs_dir: str | Path = "runs", select: str | None = None,
            postprocess: str | Path | None = None) -> PredictResult:
    """PNG, TIFF or JPEG files or folders -> ``out/<stem>.png`` masks in the dataset's mask values at each image's own
    size, plus ``<stem>_overlay.png`` with ``overlay`` (``kagglecmr predict``); ``postprocess`` as
    :func:`load_ensemble`'s."""
    from kagglecmr.engine.mask_files import predict_files

    inputs = [images] if isinstance(images, (str, Path)) else list(images)
    pred = load_ensemble(runs, tta=tta, tta_flips=tta_flips, weights=weights, device=device, batch_size=batch_size,
                         full=full, runs_dir=runs_dir, select=select, postprocess=postprocess)
    res = predict_files(pred, inputs, Path(out), overlay=overlay, force=force)
    return PredictResult(res["masks"], res["overlays"], list(res["labels"]), res["files"])


def export(runs: list[str | Path] | str | Path | None = None, *, out: str | Path, format: str = "onnx",  # noqa: A002
           tta: bool = False, tta_flips: list[str] | None = None, weights: list[float] | None = None,
           data: str | Path | None = None, full: bool = True, force: bool = False,
           runs_dir: str | Path = "runs", select: str | None = None) -> ExportResult:
    """The whole ensemble as one ONNX / TorchScript file, verified against ``ensemble`` on ``data``'s
    labelled images (``kagglecmr export``)."""
    from kagglecmr.engine.exporter import FORMATS, _require_onnx, export_ensemble
    from kagglecmr.utils.errors import KaggleCMRError

    if format not in FORMATS:
        raise KaggleCMRError(f"--format {format}: expected onnx or torchscript")
    if format == "onnx":
        _require_onnx()  # before minutes of loading
    for r in [] if runs is None else [runs] if isinstance(runs, (str, Path)) else runs:
        if Path(r).is_file() or Path(r).suffix.lower() in (".onnx", ".pt"):
            raise KaggleCMRError(f"{r}: an exported file, not a run folder; export takes the run folders it was "
                                 f"made from (--runs runs/<name>)")
    pred = load_ensemble(runs, tta=tta, tta_flips=tta_flips, weights=weights, device="cpu", full=full,
                         runs_dir=runs_dir, select=select)
    info = export_ensemble(pred, Path(out), format, data=None if data is None else Path(data), force=force)
    return ExportResult(Path(out), Path(out).with_name(Path(out).name + ".json"), info["max_abs_error"],
                        info["checked_on"], info)


def load_export(path: str | Path) -> ExportedModel:
    """An exported file loaded back: ``.predict_proba(uint8 [N, C, H, W])`` -> float32 ``[N, K, H, W]``; the export of
    a tiled run takes any size and predicts it by the tiles its ``.tile`` records, as ``ensemble`` does."""
    from kagglecmr.engine.exporter import load_export as _load

    return _load(Path(path))


def pseudo_label(runs: list[str | Path], *, data: str | Path = "data", split: str = "test", out: str | Path | None = None,
                 confidence: float = 0.9, tta: bool = False, force: bool = False, device: str = "auto",
                 select: str | None = None):
    """Pseudo masks of an unlabelled split (``kagglecmr pseudo-label``): one set per fold from that fold's
    teacher models only, one from the whole ensemble; ``select`` (best, last, swa) picks that checkpoint of
    every teacher fold; returns what :func:`kagglecmr.engine.pseudo.pseudo_label` returns."""
    from kagglecmr.engine.pseudo import pseudo_label as run

    return run(runs=[Path(r) for r in runs], data_root=Path(data), split=split, out=None if out is None else Path(out),
               confidence=confidence, tta=tta, force=force, device=device, select=select)


def set_cache_dir(path: str | Path | None) -> None:
    """Where decoded splits are cached as arrays on disk (read a batch at a time) for the rest of this process
    (``--cache-dir``): a folder, ``"off"`` (decode into memory every time), or None (``$KAGGLECMR_CACHE``, else
    ``~/.cache/kagglecmr``); see :mod:`kagglecmr.data.cache`."""
    from kagglecmr.data.cache import set_cache_dir as _set

    _set(path)


def runs(runs_dir: str | Path = "runs", *, as_json: bool = False) -> list[dict]:
    """The local leaderboard (``kagglecmr runs``): prints one row per run folder under ``runs_dir``, best OOF
    first (one JSON array with ``as_json``), and returns the rows as dicts."""
    from kagglecmr.reports.leaderboard import run_runs

    return run_runs(Path(runs_dir), as_json=as_json)


def report(run: str | Path, *, data: str | Path | None = None, worst: int = 12) -> Path:
    """Write ``<run>/report.html`` (``kagglecmr report``): one self-contained page about the run (config,
    dataset, timings, per-fold and per-class OOF scores, curves, the ``worst`` OOF images when ``data`` is
    given, the postprocessing plan); returns its path."""
    from kagglecmr.reports.html_report import write_report

    return write_report(Path(run), data=None if data is None else Path(data), worst=worst)


__all__ = ["demo_data", "make_folds", "score", "encode", "train", "ensemble", "load_ensemble", "predict", "export",
           "load_export", "pseudo_label", "runs", "report", "set_cache_dir", "DemoDataResult", "FoldsResult", "EncodeResult",
           "TrainResult", "EnsembleResult", "PredictResult", "ExportResult"]
