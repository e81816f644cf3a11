"""``kagglecmr ensemble``: fold-averaged softmax with flip TTA, OOF-tuned postprocessing, leaderboard CSV.

For every run (``runs/<name>``), the best checkpoint of each fold is loaded; a split's images are
predicted by every fold model and TTA pass, the **softmax probabilities** are averaged (over TTA,
folds, then runs with optional weights) and the argmax is the mask.  ``--split oof`` predicts each
labelled image only with the fold models that did not train on it: the honest estimate, and what the
postprocessing is chosen on.  Every OOF score, the postprocessing and ``--weights auto`` use the dataset's
metric (``metric:`` in its dataset file; mean Dice over rows by default).  Several splits (``--split
oof,test``) are predicted from one load of the models and one OOF pass; :func:`run_ensemble` also takes
runs already loaded (``loaded=``).

A fold's model is the checkpoint its ``train.select`` names (best epoch, last epoch or SWA).  Runs
trained on different folds files (or on pseudo labels made on different folds files) are refused: their
out-of-fold predictions would mix hold-outs.  ``--weights auto`` fits the run weights on the OOF
probabilities (:mod:`kagglecmr.engine.blend`), prints each run's OOF, the equal-weight and the fitted blend
and an honest nested estimate, and saves the weights beside the submission (``<csv stem>.weights.json``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kagglecmr.cfg.config import Config
from kagglecmr.data.batches import to_tensor
from kagglecmr.data.context import add_context
from kagglecmr.data.dataset import apply_dataset, load_dataset
from kagglecmr.data.loader import Split
from kagglecmr.engine.blend import blend_table, fit_weights, nested_estimate
from kagglecmr.engine.ensemble_split import split_images, submission_path, write_split  # noqa: F401 (re-exported)
from kagglecmr.engine.evaluator import truth_masks
from kagglecmr.engine.gate_runs import choose_gating, gate_kinds, gated, presence_of, split_keep
from kagglecmr.engine.infer import TTA_PASSES, TTA_TURNS, predict_proba, predict_proba_tiled
from kagglecmr.engine.outputs import contact_sheet_path, label_at_size, score_report, write_masks  # noqa: F401 (re-exported)
from kagglecmr.engine.postprocess import apply_plan, describe_plan, load_plan, save_plan, tune_plan
from kagglecmr.engine.rundir import check_same_folds, record_ensemble_oof
from kagglecmr.engine.tiles import needs_tiles
from kagglecmr.formats.competition_metric import Metric, MetricTable
from kagglecmr.models.checkpoint import load_best, model_file, selected_model_file
from kagglecmr.models.factory import build_model
from kagglecmr.utils.errors import ConfigError, KaggleCMRError
from kagglecmr.utils.io import atomic_write_json
from kagglecmr.utils.runtime import amp_dtype, resolve_device, setup_threads


@dataclass
class Run:
    """The fold models of one training run, with the ids each fold held out."""

    name: str
    path: Path
    cfg: Config
    models: dict[int, torch.nn.Module]
    holdout: dict[int, list[str]] = field(default_factory=dict)
    kept: dict[int, str] = field(default_factory=dict)  # checkpoint file each fold's model came from


def latest_run(runs_dir: Path) -> Path:
    runs_dir = Path(runs_dir)
    cands = [d for d in runs_dir.glob("*") if d.is_dir() and any(d.glob("fold*/best.safetensors"))] \
        if runs_dir.is_dir() else []
    if not cands:
        raise KaggleCMRError(f"{runs_dir}: no trained runs found (train --fold 0..4 first, or pass --runs)")
    return max(cands, key=lambda d: max(p.stat().st_mtime for p in d.glob("fold*/best.safetensors")))


def load_run(path: Path, device: torch.device, *, with_full: bool = False, select: str | None = None) -> Run:
    """Load the kept model of every fold (0..n-1, each finished; its ``train.select``, or ``select`` =
    best, last or swa for all folds) and, with ``with_full``, of the full fit (``full/``, from
    ``train --fold all``) when it exists.  The full fit holds nothing out, so it never enters
    out-of-fold predictions."""

    path = Path(path)
    if not path.is_dir():
        raise KaggleCMRError(f"{path}: run folder not found")
    fold_dirs = sorted((d for d in path.glob("fold*") if d.name[4:].isdigit()), key=lambda d: int(d.name[4:]))
    if not fold_dirs:
        raise KaggleCMRError(f"{path}: no fold folders (train --fold 0..4 first)")
    n = int(fold_dirs[-1].name[4:]) + 1
    models, holdout, kept_files, cfg = {}, {}, {}, None
    dirs = [path / f"fold{k}" for k in range(n)] + ([path / "full"] if with_full and (path / "full").is_dir() else [])
    for k, d in enumerate(dirs):
        if not (d / "summary.json").is_file() or not model_file(d).is_file():
            raise KaggleCMRError(f"{path}: {d.name} is missing or unfinished "
                                 f"(train --fold {'all' if d.name == 'full' else k} --name {path.name})")
        kept = selected_model_file(d, select, path)
        sd, meta = load_best(kept)
        kept_files[k] = f"{d.name}/{kept.name}"
        try:
            fcfg = Config.model_validate(meta["config"])
        except Exception:
            raise KaggleCMRError(f"{kept}: checkpoint carries no valid config") from None
        if cfg is not None and (fcfg.data.num_classes, fcfg.data.in_channels) != (cfg.data.num_classes, cfg.data.in_channels):
            raise KaggleCMRError(f"{d}: {fcfg.data.num_classes} classes / {fcfg.data.in_channels} channels, "
                                 f"fold0 has {cfg.data.num_classes} / {cfg.data.in_channels}")
        cfg = cfg or fcfg
        model = build_model(fcfg, weights="none", check_size=False)
        model.load_state_dict(sd)
        models[k] = model.to(device).to(memory_format=torch.channels_last).eval()
        if (d / "oof.npz").is_file():
            with np.load(d / "oof.npz") as z:
                holdout[k] = [str(i) for i in z["ids"]]
    return Run(path.name, path, cfg, models, holdout, kept_files)


def check_compatible(runs: list[Run]) -> None:
    ref = runs[0].cfg.data
    for r in runs[1:]:
        d = r.cfg.data
        if (d.num_classes, d.in_channels, d.size) != (ref.num_classes, ref.in_channels, ref.size):
            raise KaggleCMRError(f"{r.path}: {d.num_classes} classes, {d.in_channels} channels, {d.size} px; "
                                 f"{runs[0].path} has {ref.num_classes}, {ref.in_channels}, {ref.size}")


def tta_passes(runs: list[Run], tta: bool, flips: list[str] | None) -> list[str]:
    """The TTA set: ``--tta-flips`` or the config's ``infer.tta``; warns about flips/turns never trained on."""
    if not tta:
        return ["none"]
    passes = flips or list(runs[0].cfg.infer.tta)
    bad = [p for p in passes if p not in TTA_PASSES]
    if bad:
        raise ConfigError(f"--tta-flips: unknown pass '{bad[0]}' (valid: {', '.join(TTA_PASSES)})")
    for r in runs:
        a = r.cfg.augment
        unseen = [p for p in passes if (p in ("hflip", "hvflip") and a.hflip == 0)
                  or (p in ("vflip", "hvflip") and a.vflip == 0) or (p in TTA_TURNS and a.rot90 == 0)]
        if unseen:
            print(f"warning: TTA pass(es) {', '.join(unseen)} use flips run {r.name} never saw in training "
                  f"augmentation", flush=True)
    return passes


def _weights(runs: list[Run], weights: list[float] | None) -> np.ndarray:
    if weights is None or weights == "auto":
        return np.ones(len(runs)) / len(runs)
    if len(weights) != len(runs) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--weights: need {len(runs)} non-negative weights, one per run")
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def predict_images(runs: list[Run], images: np.ndarray, device, passes, weights, batch_size) -> np.ndarray:
    """Mean softmax of every fold model of every run (weighted by run) over ``passes``."""
    xs = {}  # uploaded once per input context (data.context), shared by every model
    total = None
    for r, w in zip(runs, weights):
        ctx = r.cfg.data.context
        if r.cfg.tile is not None and needs_tiles(images.shape[1:3], r.cfg.tile.size):  # windows (numpy side)
            p = predict_proba_tiled(list(r.models.values()), add_context(images, ctx), device, tile=r.cfg.tile,
                                    tta=passes, amp=amp_dtype(r.cfg.train.amp, device))
            total = (p if w == 1 else p * w) if total is None else total + p * w  # (one run: no float64 copy)
            continue
        if ctx not in xs:
            xs[ctx] = to_tensor(add_context(images, ctx), device)
        p = predict_proba(list(r.models.values()), xs[ctx], device, tta=passes, batch_size=batch_size,
                          amp=amp_dtype(r.cfg.train.amp, device))
        total = (p if w == 1 else p * w) if total is None else total + p * w
    return total


BLOCK_BYTES = 512 << 20  # a split's images are predicted in blocks whose float32 probabilities are at most this


def predict_blocks(runs: list[Run], images, device, passes, weights, batch_size):
    """``(start, probabilities)`` of ``images`` a block at a time (:data:`BLOCK_BYTES`, whole batches; one block
    with partner context, whose partners are found among all the images)."""
    per_image = runs[0].cfg.data.num_classes * int(np.prod(images.shape[1:3])) * 4
    n = max(batch_size, BLOCK_BYTES // per_image // batch_size * batch_size)
    n = len(images) if any(r.cfg.data.context != "none" for r in runs) else n
    for s in range(0, len(images), max(n, 1)):
        yield s, predict_images(runs, images[s:s + n], device, passes, weights, batch_size)


def predict_oof(runs: list[Run], data: Split, device, passes, weights, batch_size) -> np.ndarray:
    """Each labelled image predicted only by the fold models that held it out."""
    out = np.zeros((len(data), runs[0].cfg.data.num_classes, *data.images.shape[1:3]), dtype=np.float32)
    pos = {i: k for k, i in enumerate(data.ids)}
    for r, w in zip(runs, weights):
        covered = set()
        images = add_context(data.images, r.cfg.data.context)  # partners found among all labelled images
        for k, model in r.models.items():
            ids = [i for i in r.holdout.get(k, []) if i in pos]
            if not ids:
                continue
            idx = np.array([pos[i] for i in ids])
            out[idx] += w * predict_proba_tiled(model, images[idx], device, tile=r.cfg.tile, tta=passes,
                                                batch_size=batch_size, amp=amp_dtype(r.cfg.train.amp, device))
            covered.update(ids)
        missing = [i for i in data.ids if i not in covered]
        if missing:
            raise KaggleCMRError(f"{r.path}: {len(missing)} labelled images are in no fold's hold-out "
                                 f"(e.g. {missing[0]}); were the folds made on this data?")
    return out


def _score_line(table: MetricTable) -> str:
    per = " ".join(f"{k}:{v:.4f}" for k, v in zip(table.classes, table.per_class))
    return f"{table.score:.4f} [{per}]"


def report_oof(probs: np.ndarray, labelled: Split, passes, num_classes: int, metric: Metric | None = None) -> np.ndarray:
    """Print the OOF score (the dataset's metric) and the number of empty truth rows; returns the argmax masks."""
    metric = metric or Metric()
    pred = probs.argmax(1).astype(np.uint8)
    table = metric.table_labels(pred, labelled.masks, num_classes)
    print(f"OOF {metric.title} ({len(labelled)} images, TTA {'+'.join(passes)}): {_score_line(table)}", flush=True)
    classes = np.array(metric.scored(num_classes))
    empty = (labelled.masks[:, None] == classes[None, :, None, None]).sum((2, 3)) == 0
    print(f"OOF empty truth rows: {int(empty.sum())} of {empty.size}", flush=True)
    return pred


def record_oof(run_dir: Path, passes, pred: np.ndarray, truth: np.ndarray, plan: dict | None, num_classes: int,
               metric: Metric | None = None, keep=None) -> None:
    """Store the OOF score of this TTA set (and after ``plan``, gated by ``keep``) in the run's ``ensemble_oof.json``."""
    metric = metric or Metric()
    pp = (metric.table_labels(gated(apply_plan(pred, plan, num_classes), keep), truth, num_classes)
          if plan is not None else None)
    record_ensemble_oof(run_dir, list(passes), metric.table_labels(pred, truth, num_classes), pp, plan)


def choose_postprocessing(pred: np.ndarray, labelled: Split, num_classes: int, metric: Metric | None = None) -> dict:
    """Tune the per-class plan on OOF masks with the dataset's metric and print the result."""
    metric = metric or Metric()
    plan, _, _, _ = tune_plan(pred, labelled.masks, num_classes, metric=metric)
    after = metric.table_labels(apply_plan(pred, plan, num_classes), labelled.masks, num_classes)
    print(f"postprocessing chosen on OOF: {describe_plan(plan)} -> OOF {metric.title} {_score_line(after)}", flush=True)
    return plan


def fit_blend(loaded: list[Run], labelled: Split, dev, passes, batch_size,
              metric: Metric | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """``--weights auto``: per-run OOF probabilities, weights fitted on them with the dataset's metric (printed
    with each run's OOF, the equal-weight blend and a nested honest estimate).  Returns ``(weights, blended OOF
    probs, record)``."""

    metric = metric or Metric()
    k = loaded[0].cfg.data.num_classes
    probs = [predict_oof([r], labelled, dev, passes, np.ones(1), batch_size) for r in loaded]
    record = {"runs": [str(r.path) for r in loaded], "tta": list(passes), "metric": metric.to_dict(), "oof": {}}
    for r, p in zip(loaded, probs):
        t = blend_table([p], [1.0], labelled.masks, k, metric)
        record["oof"][r.name] = t.score
        print(f"OOF {r.name}: {_score_line(t)}", flush=True)
    equal = np.full(len(loaded), 1 / len(loaded))
    t_eq = blend_table(probs, equal, labelled.masks, k, metric)
    print(f"OOF equal-weight blend: {_score_line(t_eq)}", flush=True)
    w, method = fit_weights(probs, labelled.masks, k, metric)
    t_fit = blend_table(probs, w, labelled.masks, k, metric)
    shown = ", ".join(f"{r.name} {x:.2f}" for r, x in zip(loaded, w))
    print(f"OOF fitted blend ({shown}; {method}): {_score_line(t_fit)} -- optimistic: the weights were chosen "
          f"on this same OOF", flush=True)
    fold_of = {i: f for r in loaded[:1] for f, ids in r.holdout.items() for i in ids}
    groups = np.array([fold_of.get(i, -1) for i in labelled.ids])
    t_nest, per_fold = nested_estimate(probs, labelled.masks, k, groups, metric)
    print(f"OOF fitted blend, nested (weights fitted on the other folds, honest): {_score_line(t_nest)}", flush=True)
    record |= {"weights": {r.name: float(x) for r, x in zip(loaded, w)}, "method": method,
               "oof_equal": t_eq.score, "oof_fitted": t_fit.score,
               "oof_fitted_nested": t_nest.score, "nested_weights": [list(map(float, x)) for x in per_fold]}
    total = sum(p * np.float32(x) for p, x in zip(probs, w))
    return w, total, record


SPLITS = ("test", "val", "train", "oof")


def check_splits(split: str | list[str], out: Path | None) -> list[str]:
    """``--split`` as a list of known splits, each once; ``--out`` only with one split, and not an existing file."""
    splits = [split] if isinstance(split, str) else list(split)
    if not splits:
        raise KaggleCMRError("--split: no split given (test, val, train or oof)")
    for s in splits:
        if s not in SPLITS:
            raise KaggleCMRError(f"--split {s}: expected test, val, train or oof")
    if len(set(splits)) != len(splits):
        raise KaggleCMRError(f"--split {','.join(splits)}: give each split once")
    if out is not None and len(splits) > 1:
        raise KaggleCMRError(f"--out {out}: names one file, but {len(splits)} splits were asked for "
                             f"(leave --out out: files are named per split)")
    if out is not None and Path(out).exists():  # before minutes of inference, and before postprocess.json
        raise KaggleCMRError(f"{out}: already exists (choose another --out)")
    return splits


def open_ensemble(runs, runs_dir: Path, data_root: Path, split, out, device: str, loaded, with_full: bool,
                  select: str | None):
    """``(splits, dataset, device, loaded runs)`` of an ensemble, every split and run checked (same folds,
    compatible models) before anything is predicted."""
    splits = check_splits(split, out)
    ds = load_dataset(data_root)
    for s in splits:
        if s != "oof" and s not in ds.split_names():
            raise KaggleCMRError(f"{data_root}: no split '{s}' (has {', '.join(ds.split_names())})")
    if "oof" in splits and not any(ds.has_masks(s) for s in ("train", "val")):
        raise KaggleCMRError(f"{data_root}: --split oof needs labelled images (train/ or val/ with masks)")
    dev = resolve_device(device)
    setup_threads(0)
    if loaded is None:
        run_paths = list(runs) if runs else [latest_run(runs_dir)]
        check_same_folds(run_paths)
        loaded = [load_run(p, dev, with_full=with_full and splits != ["oof"], select=select) for p in run_paths]
    check_same_folds([r.path for r in loaded])
    check_compatible(loaded)
    return splits, ds, dev, loaded


def run_ensemble(*, runs: list[Path] | None, runs_dir: Path, data_root: Path, split: str | list[str], tta: bool,
                 tta_flips: list[str] | None, out: Path | None, save_masks: Path | None, postprocess: str,
                 weights: list[float] | None, device: str, batch_size: int | None = None, with_full: bool = True,
                 loaded: list[Run] | None = None, select: str | None = None, gate: str | None = None) -> dict:
    """Ensemble ``split`` (one name -> its result dict) or several (a list -> ``{split: result}``, one
    load of the models, one OOF pass; ``save_masks`` then gets a sub-folder per split).  ``loaded``:
    runs already loaded with :func:`load_run` on ``device`` (``runs``/``runs_dir`` are then ignored).
    ``select``: best, last or swa for every fold instead of each fold's ``train.select`` (``last``/``swa``
    make the OOF and a weight fit honest: no epoch chosen on the fold it scores).  ``gate``: empty-mask gating
    tuned with ``postprocess="auto"`` (:mod:`kagglecmr.engine.gate_runs`)."""

    t0 = time.time()
    splits, ds, dev, loaded = open_ensemble(runs, runs_dir, data_root, split, out, device, loaded, with_full, select)
    w = _weights(loaded, weights)
    passes = tta_passes(loaded, tta, tta_flips)
    cfg = loaded[0].cfg
    apply_dataset(cfg, ds)  # the models' classes / channels / size must be the dataset's
    k = ds.num_classes
    batch_size = batch_size or cfg.infer.batch_size_for(dev.type)
    n_models = sum(len(r.models) for r in loaded)
    print(f"ensemble of {n_models} models from {', '.join(r.name for r in loaded)} | TTA {'+'.join(passes)} | "
          f"device {dev}", flush=True)

    has_labels = any(ds.has_masks(s) for s in ("train", "val"))
    labelled = ds.labelled() if has_labels else None
    plan = oof_probs = blend = oof_presence = None
    kinds = gate_kinds(gate, loaded) if postprocess == "auto" else ()
    if weights == "auto":
        if labelled is None:
            raise KaggleCMRError(f"{data_root}: --weights auto fits on out-of-fold predictions and needs labelled images")
        w, oof_probs, blend = fit_blend(loaded, labelled, dev, passes, batch_size, ds.metric)
    if postprocess not in ("auto", "none"):
        plan = load_plan(postprocess, k)
        print(f"postprocessing from {postprocess}: {describe_plan(plan)}", flush=True)
    if labelled is not None and ("oof" in splits or postprocess == "auto"):
        if oof_probs is None:
            oof_probs = predict_oof(loaded, labelled, dev, passes, w, batch_size)
        oof_pred = report_oof(oof_probs, labelled, passes, k, ds.metric)
        if any(tuple(hw) != labelled.masks.shape[1:] for hw in labelled.sizes()):  # resized for the model

            own = {i: label_at_size(p, hw) for i, p, hw in zip(labelled.ids, oof_probs, labelled.sizes())}
            print(score_report("OOF at each image's own size (the leaderboard's way)", own,
                               truth_masks(ds, None, labelled.ids), ds), flush=True)
        if postprocess == "auto":
            plan = choose_postprocessing(oof_pred, labelled, k, ds.metric)
            plan, oof_presence = choose_gating(kinds, loaded, labelled, oof_probs, apply_plan(oof_pred, plan, k), plan,
                                               device=dev, passes=passes, weights=w, batch_size=batch_size,
                                               metric=ds.metric, names=ds.classes)
            if len(loaded) == 1 and select is None:  # the run's own models: its plan and record
                save_plan(plan, loaded[0].path / "postprocess.json")
        if len(loaded) == 1 and select is None:  # for `kagglecmr runs` and `report`: OOF per TTA set, with postprocessing
            keep = split_keep(plan, oof_probs, presence_of(loaded, labelled, True, dev, passes, w, batch_size, oof_presence))
            record_oof(loaded[0].path, passes, oof_pred, labelled.masks, plan, cfg.data.num_classes, ds.metric, keep)
    elif postprocess == "auto":
        print("note: no labelled images, so no out-of-fold postprocessing", flush=True)

    results = {}
    for s in splits:
        masks_dir = save_masks if save_masks is None or len(splits) == 1 else Path(save_masks) / s
        images = split_images(s, loaded, labelled, ds, data_root)
        blocks = [(0, oof_probs)] if s == "oof" else predict_blocks(loaded, images.images, dev, passes, w, batch_size)
        results[s] = write_split(s, loaded, images, blocks, plan, ds=ds, dev=dev, passes=passes, w=w,
                                 batch_size=batch_size, out=out, save_masks=masks_dir, t0=t0, oof_presence=oof_presence)
        results[s]["weights"] = [float(x) for x in w]
        if blend is not None:

            wpath = Path(results[s]["out"]).with_name(Path(results[s]["out"]).stem + ".weights.json")
            atomic_write_json(wpath, blend | {"submission": results[s]["out"], "select": select or "train.select"})
            results[s]["blend"] = blend
            print(f"blend weights -> {wpath}", flush=True)
    return results[split] if isinstance(split, str) else results
