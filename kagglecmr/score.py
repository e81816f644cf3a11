"""Leaderboard metric, submission CSV reading/writing and the ``score`` command.

The score is the mean, over every row of the truth, of the Dice coefficient between the
submission's mask and the truth's mask of that row: ``2|A∩B| / (|A|+|B|)``, 1 when both are
empty and 0 when exactly one is.  A row is one foreground class of one image (see
:mod:`kagglecmr.rle` for ids and encodings).

Image shape used to check that runs stay inside the image:

* truth masks (a mask folder, or ``--data``): the masks' own size;
* a solution CSV: 96x96, unless the solution's runs reach further, in which case the smallest
  square holding its last pixel.  Dice itself does not depend on the shape.

Pure numpy; no torch.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import labelled_mask_paths, natural_key, natural_sorted
from .errors import DataError, SubmissionError
from .io import atomic_write_text
from .rle import decode_flat, mask_folder_paths, masks_to_rows, parse_rle, parse_row_id, quoted, rle_extent

HEADER = ["id", "encoding"]
DEFAULT_SIDE = 96
N_WORST = 5


# --------------------------------------------------------------------------- Dice


def _dice(inter, size_a, size_b) -> np.ndarray:
    """Elementwise Dice from counts; 1 where both masks are empty."""
    total = np.asarray(size_a, dtype=np.float64) + np.asarray(size_b, dtype=np.float64)
    return np.where(total == 0, 1.0, 2.0 * np.asarray(inter, dtype=np.float64) / np.maximum(total, 1.0))


def dice_table(pred_labels, true_labels, num_classes: int = 4) -> np.ndarray:
    """Per-image, per-foreground-class Dice, ``float64 [N, num_classes - 1]``.

    ``pred_labels`` and ``true_labels`` are integer label maps ``[N, H, W]`` (or one ``[H, W]``)
    with values in ``0..num_classes-1``.  Column ``k-1`` is class ``k``; the leaderboard score
    of the same masks is ``dice_table(...).mean()``.
    """
    pred, true = np.asarray(pred_labels), np.asarray(true_labels)
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {true.shape}")
    if pred.ndim == 2:
        pred, true = pred[None], true[None]
    if pred.ndim != 3:
        raise ValueError(f"expected label maps [N, H, W], got shape {pred.shape}")
    for name, arr in (("prediction", pred), ("truth", true)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in 0..{num_classes - 1}")
    n, c = pred.shape[0], num_classes
    # one bincount gives every image's confusion matrix [N, pred class, true class]
    flat = (n, pred.shape[1] * pred.shape[2])
    pairs = pred.reshape(flat).astype(np.intp) * c + true.reshape(flat).astype(np.intp)
    pairs += (np.arange(n, dtype=np.intp) * c * c)[:, None]
    conf = np.bincount(pairs.ravel(), minlength=n * c * c).reshape(n, c, c)
    inter = np.diagonal(conf, axis1=1, axis2=2)[:, 1:]
    return _dice(inter, conf.sum(axis=2)[:, 1:], conf.sum(axis=1)[:, 1:])


def rle_dice(pred_enc: str, true_enc: str, num_pixels: int) -> float:
    """Dice between two encodings of an image with ``num_pixels`` pixels."""
    a, b = decode_flat(pred_enc, num_pixels), decode_flat(true_enc, num_pixels)
    return float(_dice(np.count_nonzero(a & b), np.count_nonzero(a), np.count_nonzero(b)))


# --------------------------------------------------------------------------- CSV


def _read_text(path: Path) -> str:
    if not path.exists():
        raise SubmissionError(f"{path}: file not found")
    if not path.is_file():
        raise SubmissionError(f"{path}: not a file (expected a CSV with header 'id,encoding')")
    data = path.read_bytes()
    if not data.strip():
        raise SubmissionError(f"{path}: empty file (expected header 'id,encoding')")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SubmissionError(f"{path}: not a CSV text file (not UTF-8)") from None


def _check_row(fields: list[str], num_pixels: int | None) -> tuple[str, str]:
    """Validate one data row (without its location) and return ``(id, encoding)``."""
    if not fields:
        raise SubmissionError("blank line")
    if len(fields) != 2:
        raise SubmissionError(f"expected 2 fields (id,encoding), found {len(fields)}")
    rid, enc = fields
    parse_row_id(rid)
    try:
        parse_rle(enc, num_pixels)
    except SubmissionError as exc:
        raise SubmissionError(f"{rid}: {exc}") from None
    return rid, enc


def parse_submission(text: str, name: str | Path, shape: tuple[int, int] | None = None) -> dict[str, str]:
    """Parse and validate submission CSV text; errors name ``name`` and the line.

    With ``shape`` ``(H, W)``, runs past the image's last pixel are errors too.
    """
    num_pixels = None if shape is None else shape[0] * shape[1]
    reader = csv.reader(io.StringIO(text.rstrip("\r\n"), newline=""), strict=True)
    rows: dict[str, str] = {}
    lines: dict[str, int] = {}
    try:
        header = next(reader, [])
        if header != HEADER:
            raise SubmissionError(f"line 1: header is {quoted(','.join(header))}, expected 'id,encoding'")
        for fields in reader:
            try:
                rid, enc = _check_row(fields, num_pixels)
                if rid in rows:
                    raise SubmissionError(f"duplicate id {quoted(rid)} (first on line {lines[rid]})")
            except SubmissionError as exc:
                raise SubmissionError(f"line {reader.line_num}: {exc}") from None
            rows[rid], lines[rid] = enc, reader.line_num
    except csv.Error as exc:
        raise SubmissionError(f"{name}: line {reader.line_num}: not valid CSV ({exc})") from None
    except SubmissionError as exc:
        raise SubmissionError(f"{name}: {exc}") from None
    if not rows:
        raise SubmissionError(f"{name}: no rows after the header")
    return rows


def read_submission(path: str | Path, shape: tuple[int, int] | None = None) -> dict[str, str]:
    """Read a submission / solution CSV ``{id: encoding}`` in file order, strictly validated.

    One-line :class:`SubmissionError` naming the file (and line) for: missing or empty file,
    not UTF-8 text, bad CSV quoting, a header other than exactly ``id,encoding``, a row without
    exactly two fields, a bad or duplicate id, and a malformed encoding (odd count, non-integer,
    start or length < 1, unsorted or overlapping runs, and with ``shape`` runs past the image).
    Accepts CRLF line endings, a UTF-8 BOM, a trailing newline and ``""`` for an empty encoding.
    """
    path = Path(path)
    return parse_submission(_read_text(path), path, shape=shape)


def submission_text(rows) -> str:
    """CSV text of ``(id, encoding)`` rows, header first, ``\\n`` line endings."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
    return buf.getvalue()


def write_submission(rows, path: str | Path, *, shape: tuple[int, int], overwrite: bool = False) -> Path:
    """Write rows ``(id, encoding)`` as a submission CSV, atomically, after validating them.

    The text is parsed back with :func:`parse_submission` (the reader the scorer uses) and
    every encoding is checked against ``shape`` before anything touches the disk.
    """
    text = submission_text(rows)
    parse_submission(text, path, shape=shape)
    return atomic_write_text(path, text, overwrite=overwrite)


# --------------------------------------------------------------------------- scoring


@dataclass
class ScoreResult:
    """Outcome of scoring: overall and per-class mean Dice, and the worst rows."""

    score: float
    per_class: dict[str, float]
    rows: int
    images: int
    worst: list[tuple[str, float]]
    row_dice: dict[str, float] = field(default_factory=dict, repr=False)

    @classmethod
    def from_row_dice(cls, row_dice: dict[str, float]) -> ScoreResult:
        """Summarise ``{row id: Dice}`` (every truth row)."""
        by_class: dict[int, list[float]] = {}
        images = set()
        for rid, d in row_dice.items():
            image, k = parse_row_id(rid)
            by_class.setdefault(k, []).append(d)
            images.add(image)
        worst = sorted(row_dice.items(), key=lambda kv: (kv[1], natural_key(kv[0])))[:N_WORST]
        return cls(
            score=float(np.mean(list(row_dice.values()))),
            per_class={str(k): float(np.mean(v)) for k, v in sorted(by_class.items())},
            rows=len(row_dice),
            images=len(images),
            worst=worst,
            row_dice=dict(row_dice),
        )

    def to_dict(self) -> dict:
        """JSON-ready summary (without the per-row table)."""
        return {
            "score": self.score,
            "per_class": dict(self.per_class),
            "rows": self.rows,
            "images": self.images,
            "worst": [{"id": rid, "dice": d} for rid, d in self.worst],
        }

    def report(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"score {self.score:.6f}  (mean Dice over {self.rows} rows, {self.images} images)"]
        lines += [f"  class {k}: {v:.6f}" for k, v in self.per_class.items()]
        lines.append(f"worst {len(self.worst)} rows:")
        lines += [f"  {rid:<20} {d:.6f}" for rid, d in self.worst]
        return "\n".join(lines)


def _some(ids, n: int = 3) -> str:
    ids = natural_sorted(ids)
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")


def score_rows(
    pred: dict[str, str], truth: dict[str, str], shape: tuple[int, int], *, name: str | Path = "submission"
) -> ScoreResult:
    """Score submission rows against truth rows (both ``{id: encoding}``) of ``(H, W)`` images.

    Every truth row must be in the submission and every submission row in the truth; otherwise
    a :class:`SubmissionError` (prefixed with ``name``) gives the counts and a few of the ids.
    """
    missing = [rid for rid in truth if rid not in pred]
    if missing:
        raise SubmissionError(f"{name}: {len(missing)} of {len(truth)} truth rows missing, e.g. {_some(missing)}")
    unknown = [rid for rid in pred if rid not in truth]
    if unknown:
        raise SubmissionError(f"{name}: {len(unknown)} of {len(pred)} rows are not in the truth, e.g. {_some(unknown)}")
    num_pixels = shape[0] * shape[1]
    try:
        dice = {rid: rle_dice(pred[rid], enc, num_pixels) for rid, enc in truth.items()}
    except SubmissionError as exc:
        raise SubmissionError(f"{name}: {exc}") from None
    return ScoreResult.from_row_dice(dice)


def infer_shape(rows: dict[str, str]) -> tuple[int, int]:
    """Image shape for CSV truth: 96x96, or the smallest square holding the last run's pixel."""
    extent = max((rle_extent(enc) for enc in rows.values()), default=0)
    side = max(DEFAULT_SIDE, math.isqrt(extent - 1) + 1 if extent else 0)
    return side, side


def _truth_from_path(truth: Path, num_classes: int) -> tuple[dict[str, str], tuple[int, int]]:
    """Truth rows and shape from a mask folder or a solution CSV."""
    if truth.is_dir():
        rows, shape = masks_to_rows(mask_folder_paths(truth), num_classes)
        return dict(rows), shape
    if not truth.exists():
        raise DataError(f"{truth}: truth not found (expected a mask folder or a solution CSV)")
    rows = read_submission(truth)
    return rows, infer_shape(rows)


def _truth_from_data(submission: Path, data: Path, num_classes: int) -> tuple[dict[str, str], tuple[int, int]]:
    """Truth rows and shape from the labelled masks under ``data`` of the submission's images."""
    image_ids = natural_sorted({parse_row_id(rid)[0] for rid in read_submission(submission)})
    paths = labelled_mask_paths(data)
    unknown = [i for i in image_ids if i not in paths]
    if unknown:
        raise SubmissionError(
            f"{submission}: {len(unknown)} of {len(image_ids)} images have no mask under "
            f"{data}/train/mask or {data}/val/mask, e.g. {_some(unknown)} (use --truth)"
        )
    rows, shape = masks_to_rows({i: paths[i] for i in image_ids}, num_classes)
    return dict(rows), shape


def run_score(
    submission: str | Path,
    truth: str | Path | None = None,
    data: str | Path = Path("data"),
    as_json: bool = False,
    num_classes: int = 4,
) -> ScoreResult:
    """``kagglecmr score``: score a submission CSV and print the result.

    ``truth`` is a mask folder or a solution CSV; without it the submission's images are looked
    up among the labelled masks (train/ and val/) under ``data``.  Prints a report, or with
    ``as_json`` exactly one JSON object on stdout.
    """
    submission = Path(submission)
    if truth is None:
        truth_rows, shape = _truth_from_data(submission, Path(data), num_classes)
    else:
        truth_rows, shape = _truth_from_path(Path(truth), num_classes)
    pred = read_submission(submission, shape=shape)
    result = score_rows(pred, truth_rows, shape, name=submission)
    print(json.dumps(result.to_dict()) if as_json else result.report())
    return result
