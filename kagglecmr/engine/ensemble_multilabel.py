"""``kagglecmr ensemble`` for overlapping classes (``task: multilabel``): fold-averaged sigmoid probabilities,
per-class thresholds tuned on the OOF, one submission row per image and class.

The models, TTA passes, run weights and out-of-fold predictions are those of
:mod:`kagglecmr.engine.ensembler` (:func:`~kagglecmr.engine.ensembler.predict_oof`,
:func:`~kagglecmr.engine.ensembler.predict_images`): each model's sigmoid outputs are averaged over TTA
passes, folds and runs.  A class is predicted where its averaged probability is above its threshold;
``--postprocess auto`` chooses each class's threshold and component rule on the OOF with the competition's
metric (:mod:`kagglecmr.engine.multilabel_post`) and saves them as the run's plan (``postprocess.json``).
Probabilities are resized to each image's own size before they are thresholded.  Each class's mask gives
its own row (:class:`~kagglecmr.formats.multilabel.MultilabelFormat`); ``--save-masks DIR`` writes one PNG
per image and class, ``DIR/<class>/<id>.png``, in the dataset's mask values.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from kagglecmr.data.dataset import apply_dataset
from kagglecmr.data.loader import Split
from kagglecmr.data.mask_values import class_to_raw
from kagglecmr.engine.ensembler import (
    Run,
    _weights,
    open_ensemble,
    predict_images,
    predict_oof,
    submission_path,
    tta_passes,
)
from kagglecmr.engine.evaluator import truth_masks
from kagglecmr.engine.multilabel_post import decode_plan, metric_of, tune_multilabel_plan
from kagglecmr.engine.outputs import _bgr, contact_sheet_path, probs_at_size
from kagglecmr.engine.postprocess import describe_plan, load_plan, save_plan
from kagglecmr.engine.rundir import record_ensemble_oof
from kagglecmr.formats.multilabel import class_mask, table, table_of_maps
from kagglecmr.formats.submission_csv import write_submission
from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.io import atomic_path
from kagglecmr.utils.plots import contact_sheet


def score_line(t, names: list[str]) -> str:
    return f"{t.score:.4f} [" + " ".join(f"{n}:{v:.4f}" for n, v in zip(names, t.per_class)) + "]"


def run_ensemble_multilabel(*, runs: list[Path] | None, runs_dir: Path, data_root: Path, split: str | list[str],
                            tta: bool, tta_flips: list[str] | None, out: Path | None, save_masks: Path | None,
                            postprocess: str, weights, device: str, batch_size: int | None = None,
                            with_full: bool = True, loaded: list[Run] | None = None, select: str | None = None) -> dict:
    """:func:`kagglecmr.engine.ensembler.run_ensemble` (same arguments and results) for a multilabel dataset."""
    t0 = time.time()
    if weights == "auto":
        raise KaggleCMRError("--weights auto: not available for task multilabel yet (give the weights, e.g. "
                             "--weights 0.5,0.5)")
    splits, ds, dev, loaded = open_ensemble(runs, runs_dir, data_root, split, out, device, loaded, with_full, select)
    has_labels = any(ds.has_masks(s) for s in ("train", "val"))
    for r in loaded:
        if not r.cfg.data.multilabel:
            raise KaggleCMRError(f"{r.path}: trained with one softmax over the classes, {ds.path} has task multilabel "
                                 "(train on it again)")
    w = _weights(loaded, weights)
    passes = tta_passes(loaded, tta, tta_flips)
    cfg = loaded[0].cfg
    apply_dataset(cfg, ds)
    k, metric, names = ds.num_classes, metric_of(ds), list(ds.classes)
    batch_size = batch_size or cfg.infer.batch_size_for(dev.type)
    own = len(loaded) == 1 and select is None  # the run's own models: its plan and OOF record
    print(f"ensemble of {sum(len(r.models) for r in loaded)} models from {', '.join(r.name for r in loaded)} | "
          f"TTA {'+'.join(passes)} | sigmoid per class ({k} classes) | device {dev}", flush=True)

    labelled = ds.labelled() if has_labels else None
    plan = oof_probs = None
    if postprocess not in ("auto", "none"):
        plan = load_plan(postprocess, k + 1)
        print(f"postprocessing from {postprocess}: {describe_plan(plan)}", flush=True)
    if labelled is not None and ("oof" in splits or postprocess == "auto"):
        oof_probs = predict_oof(loaded, labelled, dev, passes, w, batch_size)
        before = table(decode_plan(oof_probs, None, k), labelled.masks, k, metric)
        print(f"OOF {metric.label} at threshold 0.5 ({len(labelled)} images, TTA {'+'.join(passes)}): "
              f"{score_line(before, names)}", flush=True)
        print(f"OOF empty truth rows: {int((before.tsize == 0).sum())} of {before.tsize.size}", flush=True)
        if postprocess == "auto":
            plan = tune_multilabel_plan(oof_probs, labelled.masks, metric)
            after = table(decode_plan(oof_probs, plan, k), labelled.masks, k, metric)
            print(f"postprocessing chosen on OOF: {describe_plan(plan)} -> OOF {metric.label} "
                  f"{score_line(after, names)}", flush=True)
            if own:
                save_plan(plan, loaded[0].path / "postprocess.json")
        if own:
            pp = table(decode_plan(oof_probs, plan, k), labelled.masks, k, metric) if plan is not None else None
            record_ensemble_oof(loaded[0].path, list(passes), before.rows, None if pp is None else pp.rows, plan)
        if any(tuple(hw) != labelled.masks.shape[1:] for hw in labelled.sizes()):  # resized for the model
            pred = {i: decode_plan(probs_at_size(p, hw), plan, k)
                    for i, p, hw in zip(labelled.ids, oof_probs, labelled.sizes())}
            t = table_of_maps(pred, truth_masks(ds, None, labelled.ids), k, metric)
            print(f"OOF at each image's own size (the leaderboard's way): {score_line(t, names)}", flush=True)
    elif postprocess == "auto":
        print("note: no labelled images, so no out-of-fold thresholds (0.5 for every class)", flush=True)

    results = {}
    for s in splits:
        masks_dir = save_masks if save_masks is None or len(splits) == 1 else Path(save_masks) / s
        images = labelled if s == "oof" else ds.load(s)
        if s == "oof":
            probs = oof_probs
        else:
            seen = {i for r in loaded for ids in r.holdout.values() for i in ids}
            if s != "test" and any(i in seen for i in images.ids):
                print(f"warning: the models trained on most '{s}' images; its score is optimistic "
                      f"(use --split oof for an honest estimate)", flush=True)
            probs = predict_images(loaded, images.images, dev, passes, w, batch_size)
        results[s] = _write_split(s, images, probs, plan, ds=ds, loaded=loaded, out=out, save_masks=masks_dir,
                                  metric=metric, t0=t0)
        results[s]["weights"] = [float(x) for x in w]
        results[s]["tta"] = passes
    return results[split] if isinstance(split, str) else results


def _write_split(split: str, images: Split, probs: np.ndarray, plan, *, ds, loaded, out, save_masks, metric,
                 t0) -> dict:
    """One split's packed masks at each image's own size, its score when labelled, its CSV and masks."""
    k, names = ds.num_classes, list(ds.classes)
    labels = [decode_plan(probs_at_size(p, hw), plan, k) for p, hw in zip(probs, images.sizes())]
    if split != "oof" and ds.has_masks(split):  # a labelled split (e.g. a holdout test set): score it
        truth = {i: ds.read_mask(mp, resize=False) for i, _, mp in ds.items(split)}
        t = table_of_maps(dict(zip(images.ids, labels)), truth, k, metric)
        print(f"{split} {metric.label}: {score_line(t, names)} ({len(truth)} images)", flush=True)
    fmt = ds.submission
    rows = [row for i, m in zip(images.ids, labels) for row in fmt.rows(i, m, k)]
    out = out or submission_path(loaded, split)
    write_submission(rows, out, shape={i: m.shape for i, m in zip(images.ids, labels)}, overwrite=False, fmt=fmt)
    empty = {c: int(sum(1 for m in labels if not class_mask(m, c).any())) for c in range(1, k + 1)}
    print(f"wrote {len(rows)} rows for {len(images)} images to {out} (empty rows per class: "
          f"{', '.join(f'{names[c - 1]}: {v}' for c, v in empty.items())}) in {time.time() - t0:.1f}s", flush=True)
    if save_masks is not None:
        write_class_masks(save_masks, images.ids, labels, ds, images.images,
                          preview=[decode_plan(p, plan, k) for p in probs])
    return {"out": str(out), "rows": len(rows), "empty": empty, "plan": plan, "ids": list(images.ids),
            "probs": probs, "labels": labels, "truth": images.masks, "runs": [str(r.path) for r in loaded],
            "multilabel": True, "metric": metric, "num_classes": k}


def write_class_masks(folder: Path, ids: list[str], packed, ds, images: np.ndarray, *, preview=None) -> None:
    """One PNG per image and class, ``<folder>/<class name>/<id>.png`` (the class's raw mask value where it
    is, 0 elsewhere; each image's own size), and the overlay contact sheet beside the folder."""
    import cv2

    folder = Path(folder)
    value = int(class_to_raw(ds.mask_values, 2)[1])  # e.g. 255 for 0/255 masks
    dtype = np.uint16 if value > 255 else np.uint8
    for c, name in enumerate(ds.classes, start=1):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, m in zip(ids, packed):
            with atomic_path(folder / name / f"{i}.png") as tmp:
                if not cv2.imwrite(str(tmp), class_mask(m, c).astype(dtype) * dtype(value)):
                    raise KaggleCMRError(f"{folder}: cannot write PNG masks")
    sheet = contact_sheet_path(folder)
    contact_sheet(_bgr(images), np.stack(preview if preview is not None else packed), ids, sheet)
    print(f"wrote {len(ids)} x {len(ds.classes)} class masks to {folder}/<class>/<id>.png and the contact sheet "
          f"{sheet}", flush=True)
