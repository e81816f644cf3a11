"""The leaderboard metric of submission rows, with Dice, IoU and pixel accuracy beside it.

The score is the dataset's metric (:mod:`kagglecmr.formats.competition_metric`); by default the mean, over
every row of the truth, of the Dice coefficient between the submission's mask and the truth's mask of
that row: ``2|A∩B| / (|A|+|B|)``, 1 when both are empty and 0 when exactly one is.  A row is one class
of one image that gets rows in the submission format (:mod:`kagglecmr.formats.submission`; CMR by
default, see :mod:`kagglecmr.formats.rle`).  Other metrics: IoU, ``map_iou`` (one object per row, or
8-connected components matched DSB style), each per row, per image or summed per dataset.  Void truth
pixels (``void``: a bool mask per image, or label :data:`~kagglecmr.formats.competition_metric.VOID` in a
label map) are left out of both masks of every row.

Also reported, averaged over rows (overall and per class) like Dice: IoU ``|A∩B| / |A∪B|`` (1
when both are empty) and pixel accuracy.  A row's pixel accuracy is the binary one-vs-rest
accuracy: the fraction of the image's pixels where prediction and truth agree (both in the class
or both outside it).  The overall ``pixel_accuracy`` is its mean over rows when scoring a CSV
(rows need not form a label map), and the fraction of correctly labelled pixels over all images
(every class, background included) when the label maps are known (:func:`score_label_maps`).

Reading and writing the CSVs: :mod:`kagglecmr.formats.submission_csv`; the ``score`` command:
:mod:`kagglecmr.engine.evaluator`.  Pure numpy; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kagglecmr.formats.competition_metric import Metric
from kagglecmr.formats.competition_metric import _confusion as _void_confusion
from kagglecmr.formats.rle import Shape, decode_flat, image_pixels
from kagglecmr.formats.submission import CMR, SubmissionFormat
from kagglecmr.utils.errors import SubmissionError
from kagglecmr.utils.naming import natural_key, natural_sorted

N_WORST = 5


# --------------------------------------------------------------------------- Dice


def _dice(inter, size_a, size_b) -> np.ndarray:
    """Elementwise Dice from counts; 1 where both masks are empty."""
    total = np.asarray(size_a, dtype=np.float64) + np.asarray(size_b, dtype=np.float64)
    return np.where(total == 0, 1.0, 2.0 * np.asarray(inter, dtype=np.float64) / np.maximum(total, 1.0))


def _confusion(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-image confusion matrices ``[N, pred class, true class]`` of label maps ``[N, H, W]``."""
    for name, arr in (("prediction", pred), ("truth", true)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in 0..{num_classes - 1}")
    n, c = pred.shape[0], num_classes
    # one bincount gives every image's confusion matrix
    flat = (n, pred.shape[1] * pred.shape[2])
    pairs = pred.reshape(flat).astype(np.intp) * c + true.reshape(flat).astype(np.intp)
    pairs += (np.arange(n, dtype=np.intp) * c * c)[:, None]
    return np.bincount(pairs.ravel(), minlength=n * c * c).reshape(n, c, c)


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
    conf = _confusion(pred, true, num_classes)
    inter = np.diagonal(conf, axis1=1, axis2=2)[:, 1:]
    return _dice(inter, conf.sum(axis=2)[:, 1:], conf.sum(axis=1)[:, 1:])


def rle_counts(pred_enc: str, true_enc: str, num_pixels: int, *, start: int = 1) -> tuple[int, int, int, int]:
    """``(|A∩B|, |A|, |B|, pixels)`` of two encodings of an image with ``num_pixels`` pixels."""
    a, b = decode_flat(pred_enc, num_pixels, start=start), decode_flat(true_enc, num_pixels, start=start)
    return int(np.count_nonzero(a & b)), int(np.count_nonzero(a)), int(np.count_nonzero(b)), int(num_pixels)


@dataclass
class ScoreResult:
    """Outcome of scoring: the metric's score overall and per class, mean Dice, IoU and pixel accuracy
    beside it, and the worst rows (by the metric's row score).

    Per-class dicts are keyed by the class index as a string (``"1"``).  ``pixel_accuracy_of``
    says how ``pixel_accuracy`` was computed: ``"rows"`` (mean over rows of the one-vs-rest
    accuracy) or ``"labels"`` (fraction of correctly labelled pixels); see the module docstring.
    ``dice``/``per_class_dice``: mean Dice over rows (the score itself under the default metric).
    """

    score: float
    per_class: dict[str, float]
    rows: int
    images: int
    worst: list[tuple[str, float]]
    iou: float
    pixel_accuracy: float
    per_class_iou: dict[str, float]
    per_class_pixel_accuracy: dict[str, float]
    row_dice: dict[str, float] = field(default_factory=dict, repr=False)
    pixel_accuracy_of: str = field(default="rows", repr=False)
    class_names: tuple[str, ...] | None = field(default=None, repr=False)
    metric: Metric = field(default_factory=Metric, repr=False)
    dice: float = float("nan")
    per_class_dice: dict[str, float] = field(default_factory=dict, repr=False)

    @classmethod
    def from_counts(cls, counts: dict[str, tuple[int, int, int, int]], fmt: SubmissionFormat = CMR, *,
                    correct_pixels: tuple[int, int] | None = None, metric: Metric | None = None,
                    row_scores: dict[str, float] | None = None) -> ScoreResult:
        """Summarise ``{row id: (|A∩B|, |A|, |B|, image pixels)}`` (every truth row; A = prediction).

        ``correct_pixels`` ``(correct, total)`` over whole label maps, when known, gives the overall
        pixel accuracy; otherwise it is the mean over rows of the one-vs-rest accuracy.  ``metric``
        (default: Dice per row) makes ``score`` and ``per_class``; ``row_scores`` are its row scores
        when the counts do not give them (``map_iou`` over components).
        """
        if not counts:
            raise ValueError("nothing to score: no rows")
        metric = metric or Metric()
        rids = list(counts)
        inter, a, b, n = (np.array(col, dtype=np.float64) for col in zip(*counts.values()))
        dice = _dice(inter, a, b)
        mrow = (np.array([row_scores[r] for r in rids], dtype=np.float64) if row_scores is not None
                else metric.from_counts(inter, a, b))
        union = a + b - inter
        iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1.0))
        acc = np.where(n == 0, 1.0, (n - (union - inter)) / np.maximum(n, 1.0))  # pixels outside A xor B
        parsed = [fmt.parse_row_id(rid) for rid in rids]
        ks = np.array([k for _, k in parsed])
        order = sorted(set(ks.tolist()))

        def per(values: np.ndarray) -> dict[str, float]:
            return {str(k): float(values[ks == k].mean()) for k in order}

        row_dice = dict(zip(rids, dice.tolist()))
        worst = sorted(zip(rids, mrow.tolist()), key=lambda kv: (kv[1], natural_key(kv[0])))[:N_WORST]
        if correct_pixels is None:
            pixel_accuracy, of = float(acc.mean()), "rows"
        else:
            pixel_accuracy, of = correct_pixels[0] / max(correct_pixels[1], 1), "labels"
        images = np.unique([image for image, _ in parsed], return_inverse=True)[1]
        if metric.per == "dataset":  # counts summed over the split per class, then the mean over classes
            per_metric = {str(k): float(metric.from_counts(inter[ks == k].sum(), a[ks == k].sum(), b[ks == k].sum()))
                          for k in order}
            score = float(np.mean(list(per_metric.values())))
        else:  # per image: the mean over images of each image's mean over its rows
            per_metric = per(mrow)
            score = float(mrow.mean() if metric.per == "row" else
                          np.mean(np.bincount(images, mrow) / np.bincount(images)))
        return cls(score=score, per_class=per_metric, rows=len(rids),
                   images=int(images.max()) + 1, worst=worst, iou=float(iou.mean()),
                   pixel_accuracy=float(pixel_accuracy), per_class_iou=per(iou), per_class_pixel_accuracy=per(acc),
                   row_dice=row_dice, pixel_accuracy_of=of, class_names=fmt.class_names, metric=metric,
                   dice=float(dice.mean()), per_class_dice=per(dice))

    @property
    def _default(self) -> bool:
        return self.metric.name == "dice" and self.metric.per == "row"

    def to_dict(self) -> dict:
        """JSON-ready summary (without the per-row table); ``metric`` says what ``score`` is."""
        return {
            "score": self.score,
            "per_class": dict(self.per_class),
            "metric": self.metric.to_dict(),
            "rows": self.rows,
            "images": self.images,
            "worst": [{"id": rid, self.metric.name: d} for rid, d in self.worst],
            "dice": self.dice,
            "per_class_dice": dict(self.per_class_dice),
            "iou": self.iou,
            "pixel_accuracy": self.pixel_accuracy,
            "per_class_iou": dict(self.per_class_iou),
            "per_class_pixel_accuracy": dict(self.per_class_pixel_accuracy),
        }

    def report(self) -> str:
        """Human-readable multi-line summary."""
        how = ("correctly labelled pixels" if self.pixel_accuracy_of == "labels"
               else "mean over rows of one-vs-rest accuracy")
        m = self.metric
        what = {"row": f"mean {m.title} over {self.rows} rows, {self.images} images",
                "image": f"{m.title}: the mean over {self.images} images of each one's mean over its rows",
                "dataset": f"{m.title}: counts summed over {self.images} images, the mean over "
                           f"{len(self.per_class)} classes"}[m.per]
        lines = [f"score {self.score:.6f}  ({what})",
                 ("" if self._default else f"Dice {self.dice:.6f}  ")
                 + f"IoU {self.iou:.6f}  pixel accuracy {self.pixel_accuracy:.6f} ({how})"]
        names = self.class_names
        labels = {k: f"{k} ({names[int(k)]})" if names and int(k) < len(names) else k for k in self.per_class}
        width = max(len(v) for v in labels.values())
        lines += [f"  class {labels[k]:<{width}}  " + ("" if self._default else f"score {v:.6f}  ")
                  + f"Dice {self.per_class_dice[k]:.6f}  IoU {self.per_class_iou[k]:.6f}  "
                  f"pixel acc {self.per_class_pixel_accuracy[k]:.6f}" for k, v in self.per_class.items()]
        lines.append(f"worst {len(self.worst)} rows ({m.title} of the row):" if not self._default
                     else f"worst {len(self.worst)} rows:")
        lines += [f"  {rid:<20} {d:.6f}" for rid, d in self.worst]
        return "\n".join(lines)


def _some(ids, n: int = 3) -> str:
    ids = natural_sorted(ids)
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")


def _check_same_ids(pred, truth, name, what: str = "rows", error=SubmissionError) -> None:
    missing = [i for i in truth if i not in pred]
    if missing:
        raise error(f"{name}: {len(missing)} of {len(truth)} truth {what} missing, e.g. {_some(missing)}")
    unknown = [i for i in pred if i not in truth]
    if unknown:
        raise error(f"{name}: {len(unknown)} of {len(pred)} {what} are not in the truth, e.g. {_some(unknown)}")


def score_rows(pred: dict[str, str], truth: dict[str, str], shape: Shape, *, name: str | Path = "submission",
               fmt: SubmissionFormat = CMR, metric: Metric | None = None,
               void: dict[str, np.ndarray] | None = None) -> ScoreResult:
    """Score submission rows against truth rows (both ``{id: encoding}`` in format ``fmt``) with ``metric``
    (default: mean Dice over rows).

    ``shape`` is the images' ``(H, W)``, or ``{image id: (H, W)}`` for images of several sizes.
    ``void``: ``{image id: bool [H, W]}`` of pixels left out of both masks of each row (not labelled).
    Every truth row must be in the submission and every submission row in the truth; otherwise
    a :class:`SubmissionError` (prefixed with ``name``) gives the counts and a few of the ids.
    """
    _check_same_ids(pred, truth, name)
    metric = metric or Metric()
    counts, row_scores = {}, {} if metric.needs_masks else None
    try:
        for rid, enc in truth.items():
            image = fmt.parse_row_id(rid)[0]
            num_pixels = image_pixels(shape, image)
            if num_pixels is None:
                raise ValueError(f"no image size for {image!r} in shape")
            v = None if void is None else void.get(image)
            if v is None and row_scores is None:
                counts[rid] = rle_counts(pred[rid], enc, num_pixels, start=fmt.start)
                continue
            hw = shape[image] if isinstance(shape, dict) else shape
            a, b = fmt.decode(pred[rid], tuple(hw)), fmt.decode(enc, tuple(hw))  # 2-D: void and components
            if v is not None:
                a, b = a & ~v, b & ~v
            counts[rid] = (int(np.count_nonzero(a & b)), int(np.count_nonzero(a)), int(np.count_nonzero(b)),
                           num_pixels - (0 if v is None else int(np.count_nonzero(v))))
            if row_scores is not None:
                row_scores[rid] = metric.component_score(a, b)
    except SubmissionError as exc:
        raise SubmissionError(f"{name}: {exc}") from None
    return ScoreResult.from_counts(counts, fmt, metric=metric, row_scores=row_scores)


def score_label_maps(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray], num_classes: int,
                     fmt: SubmissionFormat = CMR, metric: Metric | None = None) -> ScoreResult:
    """Score label maps ``{image id: [H, W]}`` (sizes may differ between images) with ``fmt``'s rows and
    ``metric`` (default: mean Dice over rows); truth pixels labelled ``VOID`` are left out.

    The numbers equal those of scoring the two label maps' CSVs in format ``fmt`` (with the void
    pixels given); ``pixel_accuracy`` is the fraction of correctly labelled pixels over all images.
    A missing or extra image, a size mismatch or a label outside ``0..num_classes-1`` is a ``ValueError``.
    """
    _check_same_ids(pred, truth, "score_label_maps", "images", ValueError)
    metric = metric or Metric()
    classes = fmt.row_classes(num_classes)
    counts, correct, total = {}, 0, 0
    row_scores = {} if metric.needs_masks else None
    for i, t in truth.items():  # rows in truth order, classes in row order, as the CSV path
        p, t = np.asarray(pred[i]), np.asarray(t)
        if t.ndim != 2 or p.shape != t.shape:
            raise ValueError(f"{i}: prediction shape {p.shape} differs from truth shape {t.shape} (or is not 2-D)")
        c = _void_confusion(p[None], t[None], num_classes)[0]  # one image at a time: any size, little memory
        n = int(c.sum())
        correct, total = correct + int(np.trace(c)), total + n
        for k in classes:
            counts[fmt.row_id(i, k)] = (int(c[k, k]), int(c[k, :].sum()), int(c[:, k].sum()), n)
        if row_scores is not None:
            rows = metric.table_labels(p, t, num_classes, classes=classes).rows[0]
            row_scores |= {fmt.row_id(i, k): float(r) for k, r in zip(classes, rows)}
    return ScoreResult.from_counts(counts, fmt, correct_pixels=(correct, total), metric=metric, row_scores=row_scores)


