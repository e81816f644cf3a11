"""The ``score`` and ``encode`` commands: a submission CSV scored against masks, masks encoded as a CSV.

Against a dataset (``--data DATASET.yaml``): its submission format, its mask values, each image at its
own size.

``score SUB.csv --data D [--split test]`` scores the CSV against the split's masks (default: the labelled
train/val masks of the submission's images) with the dataset's metric (``metric:``; by default mean Dice
over rows, empty/empty = 1), void pixels (``ignore:``) left out, and also reports Dice, IoU and pixel
accuracy.  ``encode MASKS --data D`` turns PNG masks in
the dataset's own values (``<id>_mask.png`` or ``<id>.png``, e.g. from ``ensemble --save-masks``) into
the dataset's submission CSV.  Without a dataset file (the folder form, ``--truth DIR`` or a solution CSV),
:func:`run_score` and :func:`run_encode` read PNG label masks directly.  Pure numpy; no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from kagglecmr.data.dataset import Dataset, load_dataset
from kagglecmr.data.mask_folder import mask_folder_paths, masks_to_rows
from kagglecmr.formats.competition_metric import VOID, Metric
from kagglecmr.formats.metric import ScoreResult, score_rows
from kagglecmr.formats.rle import Shape
from kagglecmr.formats.submission import CMR, SubmissionFormat
from kagglecmr.formats.submission_csv import infer_shape, read_submission, write_submission
from kagglecmr.utils.errors import DataError, KaggleCMRError, SubmissionError


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
    submission = Path(submission)
    ds = load_dataset(data)
    fmt, k = ds.submission, ds.num_classes
    if truth is not None and Path(truth).is_file():  # a solution CSV in the dataset's format
        truth_rows = read_submission(truth, fmt=fmt)
        return _score_and_print(submission, truth_rows, infer_shape(truth_rows, fmt), fmt, as_json, ds.metric)
    if truth is not None:
        masks = ds.read_mask_folder(truth)
    else:
        ids = None
        if split is None:
            seen = dict.fromkeys(fmt.parse_row_id(rid)[0] for rid in read_submission(submission, fmt=fmt))
            ids = list(seen)
        try:
            masks = truth_masks(ds, split, ids)
        except SubmissionError as exc:
            raise SubmissionError(f"{submission}: {exc}") from None
    truth_rows = {rid: enc for i, m in masks.items() for rid, enc in fmt.rows(i, m, k)}  # void pixels in no row
    void = {i: v for i, m in masks.items() if (v := m == VOID).any()} if ds.ignore else None
    return _score_and_print(submission, truth_rows, {i: m.shape for i, m in masks.items()}, fmt, as_json,
                            ds.metric, void)


def _score_and_print(submission: Path, truth_rows: dict[str, str], shape: Shape, fmt: SubmissionFormat,
                     as_json: bool, metric: Metric | None = None, void: dict | None = None) -> ScoreResult:
    """Read the submission against ``shape``, score it against the truth rows with ``metric`` (void pixels
    left out), print the report or JSON."""
    pred = read_submission(submission, shape=shape, fmt=fmt)
    result = score_rows(pred, truth_rows, shape, name=submission, fmt=fmt, metric=metric, void=void)
    print(json.dumps(result.to_dict()) if as_json else result.report())
    return result


def run_encode_dataset(mask_dir: str | Path, *, data: str | Path, out: str | Path, force: bool = False) -> int:
    """``kagglecmr encode MASKS --data DATASET``: masks in the dataset's values -> its submission CSV."""
    out = Path(out)
    if out.exists() and not force:
        raise KaggleCMRError(f"{out}: already exists (use --force to overwrite)")
    ds = load_dataset(data)
    fmt = ds.submission
    masks = ds.read_mask_folder(mask_dir)
    rows = [row for i, m in masks.items() for row in fmt.rows(i, m, ds.num_classes)]
    write_submission(rows, out, shape={i: m.shape for i, m in masks.items()}, overwrite=force, fmt=fmt)
    print(f"wrote {out}: {len(rows)} rows ({len(masks)} images, format of {ds.path})")
    return len(rows)


# ------------------------------------------------------------------ folder form (no dataset file)
def _truth_from_path(truth: Path, num_classes: int, fmt: SubmissionFormat = CMR) -> tuple[dict[str, str], Shape]:
    """Truth rows and shape from a mask folder or a solution CSV."""
    if truth.is_dir():
        rows, shape = masks_to_rows(mask_folder_paths(truth), num_classes, fmt)
        return dict(rows), shape
    if not truth.exists():
        raise DataError(f"{truth}: truth not found (expected a mask folder or a solution CSV)")
    rows = read_submission(truth, fmt=fmt)
    return rows, infer_shape(rows, fmt)


def run_score(submission: str | Path, truth: str | Path, as_json: bool = False, num_classes: int = 4,
              fmt: SubmissionFormat = CMR) -> ScoreResult:
    """``kagglecmr score SUB --truth T`` without a dataset: score a submission CSV in format ``fmt`` (CMR) and
    print the result.  ``truth`` is a mask folder (label values ``0..num_classes-1``) or a solution CSV.
    Masks may differ in size (each row is checked against its own image).  Prints a report, or with
    ``as_json`` exactly one JSON object on stdout.
    """
    submission = Path(submission)
    truth_rows, shape = _truth_from_path(Path(truth), num_classes, fmt)
    return _score_and_print(submission, truth_rows, shape, fmt, as_json)


def run_encode(mask_dir: str | Path, out: str | Path, force: bool = False, num_classes: int = 4, fmt=None) -> int:
    """``kagglecmr encode``: PNG label masks -> validated submission CSV; returns the rows written.

    Rows are in natural image order (cmr2 before cmr10), the row classes of ``fmt`` (a
    :class:`~kagglecmr.formats.submission.SubmissionFormat`, default CMR: ``1..num_classes-1``) within an
    image; masks may differ in size.  The CSV is parsed back with the scorer's reader before it is
    written atomically; an existing ``out`` is refused (and left untouched) unless ``force``.
    """
    fmt = CMR if fmt is None else fmt
    out = Path(out)
    if num_classes < 2:
        raise KaggleCMRError(f"--num-classes {num_classes}: need at least 2 (background and one class)")
    try:
        classes = fmt.row_classes(num_classes)
    except ValueError as exc:
        raise KaggleCMRError(f"--num-classes {num_classes}: {exc}") from None
    if out.exists() and not force:
        raise KaggleCMRError(f"{out}: already exists (use --force to overwrite)")
    rows, shape = masks_to_rows(mask_folder_paths(mask_dir), num_classes, fmt)
    write_submission(rows, out, shape=shape, overwrite=force, fmt=fmt)
    print(_encode_summary(rows, out, classes, fmt))
    return len(rows)


def _encode_summary(rows: list[tuple[str, str]], out: Path, classes: list[int], fmt) -> str:
    empty = {k: 0 for k in classes}
    for rid, enc in rows:
        if not enc:
            empty[fmt.parse_row_id(rid)[1]] += 1
    per_class = ", ".join(f"class {fmt.class_label(k)}: {n}" for k, n in empty.items())
    n_images = len(rows) // len(classes)
    return f"wrote {out}: {len(rows)} rows ({n_images} images x {len(classes)} classes); empty rows {per_class}"
