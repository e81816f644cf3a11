"""``score`` and ``encode`` against a dataset (``--data DATASET.yaml``): its submission format, its mask
values, each image at its own size.

``score SUB.csv --data D [--split test]`` scores the CSV against the split's masks (default: the labelled
train/val masks of the submission's images) with the competition metric (mean Dice over rows,
empty/empty = 1), and also reports IoU and pixel accuracy.  ``encode MASKS --data D`` turns PNG masks in
the dataset's own values (``<id>_mask.png`` or ``<id>.png``, e.g. from ``ensemble --save-masks``) into
the dataset's submission CSV.  Pure numpy; no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from kagglecmr.data.dataset import Dataset, load_dataset
from kagglecmr.utils.errors import KaggleCMRError, SubmissionError


def truth_masks(ds: Dataset, split: str | None, image_ids: list[str] | None = None) -> dict:
    """``{id: label map at its own size}`` of a split's masks, or (``split=None``) of ``image_ids`` among
    the labelled train/val masks."""
    if split is not None:
        if not ds.has_masks(split):
            raise KaggleCMRError(f"{ds.path}: split '{split}' has no masks to score against")
        return {i: ds.read_mask(mp, resize=False) for i, _, mp in ds.items(split)}
    paths = {i: mp for s in ("train", "val") if ds.has_masks(s) for i, _, mp in ds.items(s)}
    if not paths:
        raise KaggleCMRError(f"{ds.path}: no labelled masks (train/val) to score against")
    ids = list(paths) if image_ids is None else image_ids
    unknown = [i for i in ids if i not in paths]
    if unknown:
        raise SubmissionError(f"{len(unknown)} of {len(ids)} images have no train/val mask in {ds.path}, "
                              f"e.g. {unknown[0]} (use --split)")
    return {i: ds.read_mask(paths[i], resize=False) for i in ids}


def run_score_dataset(submission: str | Path, *, data: str | Path, split: str | None = None,
                      truth: str | Path | None = None, as_json: bool = False):
    """``kagglecmr score SUB.csv --data DATASET [--split S]``: prints a report (or one JSON object)."""
    from kagglecmr.formats.metric import read_submission, score_rows
    from kagglecmr.formats.rle import mask_folder_paths

    submission = Path(submission)
    ds = load_dataset(data)
    fmt, k = ds.submission, ds.num_classes
    if truth is not None:
        truth_paths = mask_folder_paths(truth)
        masks = {i: ds.read_mask(p, resize=False) for i, p in truth_paths.items()}
    else:
        ids = None
        if split is None:
            seen = dict.fromkeys(fmt.parse_row_id(rid)[0] for rid in read_submission(submission, fmt=fmt))
            ids = list(seen)
        try:
            masks = truth_masks(ds, split, ids)
        except SubmissionError as exc:
            raise SubmissionError(f"{submission}: {exc}") from None
    truth_rows = {rid: enc for i, m in masks.items() for rid, enc in fmt.rows(i, m, k)}
    shapes = {i: m.shape for i, m in masks.items()}
    pred = read_submission(submission, shape=shapes, fmt=fmt)
    result = score_rows(pred, truth_rows, shapes, name=submission, fmt=fmt)
    print(json.dumps(result.to_dict()) if as_json else result.report())
    return result


def run_encode_dataset(mask_dir: str | Path, *, data: str | Path, out: str | Path, force: bool = False) -> int:
    """``kagglecmr encode MASKS --data DATASET``: masks in the dataset's values -> its submission CSV."""
    from kagglecmr.formats.metric import write_submission
    from kagglecmr.formats.rle import mask_folder_paths

    out = Path(out)
    if out.exists() and not force:
        raise KaggleCMRError(f"{out}: already exists (use --force to overwrite)")
    ds = load_dataset(data)
    fmt = ds.submission
    masks = {i: ds.read_mask(p, resize=False) for i, p in mask_folder_paths(mask_dir).items()}
    rows = [row for i, m in masks.items() for row in fmt.rows(i, m, ds.num_classes)]
    write_submission(rows, out, shape={i: m.shape for i, m in masks.items()}, overwrite=force, fmt=fmt)
    print(f"wrote {out}: {len(rows)} rows ({len(masks)} images, format of {ds.path})")
    return len(rows)
