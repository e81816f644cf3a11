"""Overlapping classes (a dataset file's ``task: multilabel``): bit-packed label maps, their decoding from
sigmoid probabilities, their scores and their submission rows.  Pure numpy; no torch.

**Representation.**  A multilabel mask is one uint8 ``[H, W]`` map whose bit ``k`` says "class ``k + 1`` is
here" (classes number from 1, as the foreground classes of a softmax task do), so up to :data:`MAX_CLASSES`
classes overlap freely.  A packed map has the shape, dtype and meaning-free values of a softmax label map, so
everything that moves label maps without reading them works unchanged: the decoded-array cache, patch crops,
both augmentation backends (masks move by nearest neighbour: values, hence bits, are kept exactly), batches,
folds files, resizing (nearest) and the OOF records.  Only the places that *read* classes unpack: the loss
(:mod:`kagglecmr.models.losses_multilabel`), fold stratification, scores and submission rows.  Value
:data:`IGNORE` (255, all eight bits) stays what it is everywhere else: a pixel no loss looks at (patch padding),
which is why at most 7 classes fit.

**Classes.**  The dataset file's ``classes`` list only the foreground classes; tables have one column per class
(column ``c - 1`` is class ``c``), as a softmax task's tables have one per foreground class.  The submission
format and a labels CSV see the label names ``[NO_CLASS, *classes]`` (:func:`label_names`): ``{class}`` in a row
id is the class number 1..K and ``{name}`` its name, exactly as for a softmax task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kagglecmr.formats.competition_metric import Metric, MetricTable
from kagglecmr.formats.metric import dice_table
from kagglecmr.formats.submission import SubmissionFormat

MAX_CLASSES = 7  # bits 0..6; 255 (every bit) is the ignore value
IGNORE = 255
NO_CLASS = "(no class)"  # the label name of number 0: no row, no file, never a prediction
THRESHOLDS = "thresholds"  # the postprocessing plan's key of the per-class thresholds
THRESHOLD = 0.5  # a class is predicted where its sigmoid probability is above this (until tuned)
THRESHOLD_GRID = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.05))
EPSILON = 1e-4  # a tuned threshold must beat 0.5 by more than this (class score)
_CHUNK_PIXELS = 1 << 24  # probabilities are compared and counted this many pixels (x classes) at a time


def label_names(classes: list[str]) -> list[str]:
    """The names the submission format and labels CSVs number: ``[NO_CLASS, *classes]`` (class c = name c)."""
    return [NO_CLASS, *classes]


def pack(masks) -> np.ndarray:
    """Binary masks ``[..., K, H, W]`` -> a packed uint8 map ``[..., H, W]`` (bit ``k`` = mask ``k``)."""
    m = np.asarray(masks)
    k = m.shape[-3]
    if k > MAX_CLASSES:
        raise ValueError(f"{k} classes: a multilabel task holds at most {MAX_CLASSES}")
    out = np.zeros(m.shape[:-3] + m.shape[-2:], np.uint8)
    for c in range(k):
        out |= (m[..., c, :, :] != 0).astype(np.uint8) << c
    return out


def unpack(packed, k: int) -> np.ndarray:
    """A packed map ``[..., H, W]`` -> bool masks ``[..., K, H, W]``."""
    p = np.asarray(packed)
    return ((p[..., None, :, :] >> np.arange(k, dtype=p.dtype)[:, None, None]) & 1).astype(bool)


def class_mask(packed, c: int) -> np.ndarray:
    """Class ``c``'s (1..K) bool mask of a packed map."""
    return (np.asarray(packed) >> (c - 1)) & 1 == 1


def check_packed(packed, k: int, where: str = "mask") -> np.ndarray:
    p = np.asarray(packed)
    if p.size and int(p.max()) >= 1 << k:
        raise ValueError(f"{where}: value {int(p.max())} is not a set of {k} classes (bits 0..{k - 1})")
    return p


def check_thresholds(thresholds, num_classes: int | None = None) -> dict[str, float]:
    """A plan's ``thresholds`` ``{"1": t, ...}`` normalised (classes >= 1, 0 < t < 1), or a ValueError."""
    if not isinstance(thresholds, dict):
        raise ValueError(f"{THRESHOLDS}: expected an object {{class: threshold}}, got {thresholds!r}")
    out = {}
    for key, t in thresholds.items():
        text = str(key).strip()
        if not text.isdigit() or int(text) < 1 or (num_classes is not None and int(text) > num_classes):
            raise ValueError(f"{THRESHOLDS}: bad class {key!r}")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
            raise ValueError(f"{THRESHOLDS}: class {text}: {t!r} is not a probability between 0 and 1")
        out[str(int(text))] = float(t)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def as_thresholds(thresholds, k: int) -> np.ndarray:
    """``None`` (0.5 each), one number, ``[K]`` values or ``{"1": t, ...}`` -> float32 ``[K]``."""
    if thresholds is None:
        return np.full(k, THRESHOLD, np.float32)
    if isinstance(thresholds, dict):
        return np.array([float(thresholds.get(str(c), THRESHOLD)) for c in range(1, k + 1)], np.float32)
    t = np.asarray(thresholds, np.float32)
    return np.full(k, float(t), np.float32) if t.ndim == 0 else t


def decode(probs, thresholds=None) -> np.ndarray:
    """Sigmoid probabilities ``[..., K, H, W]`` -> packed maps ``[..., H, W]`` (class where prob > threshold)."""
    p = np.asarray(probs)
    t = as_thresholds(thresholds, p.shape[-3])
    return pack(p > t[:, None, None])


def table(pred, true, k: int, metric: Metric | None = None) -> MetricTable:
    """The metric's table of packed predictions against packed truth ``[N, H, W]`` (one column per class)."""
    metric = metric or Metric()
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"expected packed maps [N, H, W] of one shape, got {pred.shape} and {true.shape}")
    per = max(1, _CHUNK_PIXELS // max(1, k * pred[0].size if len(pred) else 1))
    parts = [metric.table_masks(unpack(pred[s:s + per], k), unpack(true[s:s + per], k), classes=range(1, k + 1))
             for s in range(0, max(len(pred), 1), per)]
    return MetricTable.concat(parts)


def table_of_maps(pred: dict, truth: dict, k: int, metric: Metric | None = None) -> MetricTable:
    """The metric's table of packed maps ``{image id: [H, W]}`` whose sizes may differ (truth's order)."""
    metric = metric or Metric()
    missing = [i for i in truth if i not in pred]
    if missing or len(pred) != len(truth):
        raise ValueError(f"predictions and truth differ in images (e.g. {(missing or sorted(set(pred) - set(truth)))[0]})")
    parts = []
    for i, t in truth.items():
        p, t = np.asarray(pred[i]), np.asarray(t)
        if p.shape != t.shape or t.ndim != 2:
            raise ValueError(f"{i}: prediction shape {p.shape} differs from truth shape {t.shape} (or is not 2-D)")
        parts.append(metric.table_masks(unpack(p, k)[None], unpack(t, k)[None], classes=range(1, k + 1)))
    return MetricTable.concat(parts)


def dice_rows(pred, true, k: int) -> np.ndarray:
    """Dice of every ``<image, class>`` row ``float64 [N, K]`` (empty/empty = 1): what ``dice_table`` is for
    a softmax task."""
    return table(pred, true, k).rows


def task_labels(probs, multilabel: bool, thresholds=None) -> np.ndarray:
    """Masks of probabilities ``[N, K, H, W]``: the argmax label maps, or with ``multilabel`` the packed maps
    of each class above its threshold (uint8 ``[N, H, W]`` either way)."""
    return decode(probs, thresholds) if multilabel else np.asarray(probs).argmax(1).astype(np.uint8)


def task_table(pred, true, num_classes: int, multilabel: bool, metric: Metric | None = None) -> MetricTable:
    """``metric``'s table of label maps (softmax: :meth:`Metric.table_labels`) or of packed maps (multilabel)."""
    metric = metric or Metric()
    return table(pred, true, num_classes, metric) if multilabel else metric.table_labels(pred, true, num_classes)


def task_rows(pred, true, num_classes: int, multilabel: bool) -> np.ndarray:
    """Dice rows ``[N, C]`` of label maps (C = the foreground classes): ``dice_table``, or of packed maps."""
    return dice_rows(pred, true, num_classes) if multilabel else dice_table(pred, true, num_classes)


# ----------------------------------------------------------------------------- thresholds
def threshold_scores(probs, true, metric: Metric | None = None, grid=THRESHOLD_GRID) -> np.ndarray:
    """Each class's score ``[len(grid), K]`` with every class cut at each threshold of ``grid``."""
    metric = metric or Metric()
    probs, true = np.asarray(probs), np.asarray(true)
    k = probs.shape[1]
    per = max(1, _CHUNK_PIXELS // max(1, probs[0].size if len(probs) else 1))
    tables: list[list[MetricTable]] = [[] for _ in grid]
    for s in range(0, len(probs), per):
        t = unpack(true[s:s + per], k)
        for j, thr in enumerate(grid):
            tables[j].append(metric.table_masks(probs[s:s + per] > thr, t, classes=range(1, k + 1)))
    return np.stack([MetricTable.concat(ts).per_class for ts in tables])


def tune_thresholds(probs, true, metric: Metric | None = None, grid=THRESHOLD_GRID,
                    epsilon: float = EPSILON) -> tuple[dict[str, float], np.ndarray]:
    """Per-class probability thresholds maximising ``metric`` on (out-of-fold) probabilities ``[N, K, H, W]``
    against packed truth ``[N, H, W]``: ``({"1": t, ...}, scores [len(grid), K])``.  Classes do not interact
    (each class's score depends on its own threshold only), so choosing class by class is exact.  A threshold
    replaces 0.5 only when it beats it by more than ``epsilon``; among equal scores the one nearest 0.5 wins."""
    grid = tuple(float(g) for g in grid)
    if THRESHOLD not in grid:
        grid = tuple(sorted((*grid, THRESHOLD)))
    scores = threshold_scores(probs, true, metric, grid)
    base = scores[grid.index(THRESHOLD)]
    order = sorted(range(len(grid)), key=lambda j: (abs(grid[j] - THRESHOLD), grid[j]))
    out = {}
    for c in range(scores.shape[1]):
        best = max(order, key=lambda j: scores[j, c])  # max() keeps the first of equal maxima: nearest 0.5
        out[str(c + 1)] = grid[best] if scores[best, c] - base[c] > epsilon else THRESHOLD
    return out, scores


# ----------------------------------------------------------------------------- submission rows
@dataclass(frozen=True)
class MultilabelFormat(SubmissionFormat):
    """A :class:`~kagglecmr.formats.submission.SubmissionFormat` whose label masks are packed maps: one row per
    class from each class's own binary mask (classes may overlap).  ``num_classes`` is the number of classes K
    (no background); row classes are numbered 1..K (``class_names`` = :func:`label_names`)."""

    def row_classes(self, num_classes: int) -> list[int]:
        return super().row_classes(num_classes + 1)

    def rows(self, image_id: str, label_mask, num_classes: int) -> list[tuple[str, str]]:
        m = np.asarray(label_mask)
        if m.ndim != 2:
            raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
        check_packed(m, num_classes, image_id)
        return [(self.row_id(image_id, c), self.encode(class_mask(m, c))) for c in self.row_classes(num_classes)]
