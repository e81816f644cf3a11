"""The competition's metric, as its dataset file states it: ``metric: {name, per, empty, ...}``.

:class:`Metric` says how a prediction is scored against the truth; every choice kagglecmr makes
(best epoch, postprocessing, thresholds, blend weights) and every score it shows goes through it.
The default, ``Metric()``, is the CMR competition's: mean Dice over ``<image, class>`` rows, 1 where
both masks of a row are empty.

``name``
    ``dice`` ``2|A∩B| / (|A|+|B|)``; ``iou`` ``|A∩B| / |A∪B|``; ``map_iou`` the mean over IoU
    thresholds ``t`` (``thresholds: [first, last, step]``, default 0.50, 0.55 … 0.95) of the
    precision ``TP / (TP + FP + FN)`` where a predicted object is a true positive when its IoU with
    a truth object is above ``t`` (TGS Salt, DSB 2018).
``per``
    ``row``: the mean over ``<image, class>`` rows (Kaggle's usual); ``image``: the mean over images
    of the mean over that image's classes; ``dataset``: intersections and sizes summed over the
    whole split per class, then the mean over classes (CamVid / Cityscapes mIoU, "global Dice";
    not with ``map_iou``).
``empty``
    The score of a row (or, per dataset, a class) whose truth and prediction are both empty: 1 or 0.
``objects`` (``map_iou`` only)
    ``mask``: a row's mask is one object (TGS); ``components``: each 8-connected component is an
    object, matched to the truth's by IoU (DSB).

Scores come from :class:`MetricTable`, built from label maps (:meth:`Metric.table_labels`, softmax
tasks, with an optional void mask) or from per-class binary masks (:meth:`Metric.table_masks`,
multilabel tasks).  In every mode the overall score equals the mean of the per-class scores.

A dataset binds its metric to the classes its submission rows hold (``classes``, from the submission
format's ``classes:``; default 1..K-1); a decoded truth label map marks void pixels ("not labelled",
the dataset file's ``ignore:``) with :data:`VOID`, which :meth:`Metric.table_labels` leaves out of both
masks.  Pure numpy (scipy for connected components); no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from kagglecmr.utils.errors import ConfigError

NAMES = ("dice", "iou", "map_iou")
PERS = ("row", "image", "dataset")
OBJECTS = ("mask", "components")
KEYS = ("name", "per", "empty", "thresholds", "objects")
VOID = 255  # label of void truth pixels in decoded masks: no loss, metric or statistic looks at them
_CHUNK_PIXELS = 1 << 24  # label maps are counted this many pixels at a time (bounded memory)
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Metric:
    """How a competition is scored (see the module docstring); the defaults are CMR's."""

    name: str = "dice"
    per: str = "row"
    empty: float = 1.0
    thresholds: tuple[float, float, float] = (0.5, 0.95, 0.05)
    objects: str = "mask"
    classes: tuple[int, ...] | None = None  # the scored classes (the submission's row classes); None: 1..K-1

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(k) for k in self.classes))
        if self.name not in NAMES:
            raise ValueError(f"name: {self.name!r}: expected one of {', '.join(NAMES)}")
        if self.per not in PERS:
            raise ValueError(f"per: {self.per!r}: expected one of {', '.join(PERS)}")
        if self.name == "map_iou" and self.per == "dataset":
            raise ValueError("per: map_iou is a mean over rows or images, not per dataset")
        if isinstance(self.empty, bool) or self.empty not in (0, 1):
            raise ValueError(f"empty: {self.empty!r}: expected 1 or 0")
        object.__setattr__(self, "empty", float(self.empty))
        if self.objects not in OBJECTS:
            raise ValueError(f"objects: {self.objects!r}: expected one of {', '.join(OBJECTS)}")
        lo, hi, step = self.thresholds if len(self.thresholds) == 3 else (None, None, None)
        if lo is None or not (0 <= lo <= hi < 1 and step > 0):
            raise ValueError(f"thresholds: {list(self.thresholds)}: expected [first, last, step] "
                             "with 0 <= first <= last < 1 and step > 0")

    @classmethod
    def from_dict(cls, d: dict | None, source: str = "metric") -> Metric:
        """Build from a dataset file's ``metric:`` mapping; any problem is a one-line ConfigError."""
        if d is None:
            return cls()
        if isinstance(d, str):
            d = {"name": d}
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: metric must be a mapping like {{name: dice, per: row, empty: 1}}")
        unknown = sorted(set(d) - set(KEYS))
        if unknown:
            raise ConfigError(f"{source}: metric: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: metric.{exc}") from None

    def for_classes(self, classes) -> Metric:
        """This metric scoring ``classes`` (label maps' class indices) by default."""
        return replace(self, classes=None if classes is None else tuple(classes))

    def scored(self, num_classes: int) -> list[int]:
        """The classes that get rows: :attr:`classes`, else ``1..num_classes-1``."""
        return list(range(1, num_classes)) if self.classes is None else list(self.classes)

    def to_dict(self) -> dict:
        d = {"name": self.name, "per": self.per, "empty": int(self.empty)}
        if self.name == "map_iou":
            d |= {"thresholds": list(self.thresholds), "objects": self.objects}
        return d

    @property
    def label(self) -> str:
        """A short name for tables and logs: ``dice``, ``iou/dataset``, ``map_iou`` …"""
        return self.name if self.per == "row" else f"{self.name}/{self.per}"

    @property
    def title(self) -> str:
        """The name in printed lines: ``Dice`` (the default), ``IoU per dataset``, ``mAP@IoU per image`` …"""
        base = {"dice": "Dice", "iou": "IoU", "map_iou": "mAP@IoU"}[self.name]
        return base if self.per == "row" else f"{base} per {self.per}"

    def threshold_values(self) -> np.ndarray:
        lo, hi, step = self.thresholds
        return np.round(np.arange(lo, hi + step / 2, step), 10)

    @property
    def needs_masks(self) -> bool:
        """True when a row's score needs the masks themselves, not only their counts."""
        return self.name == "map_iou" and self.objects == "components"

    # ------------------------------------------------------------------ scores from counts

    def from_counts(self, inter, psize, tsize) -> np.ndarray:
        """Score of each row (or class total) from ``|A∩B|``, ``|A|`` (prediction), ``|B|`` (truth)."""
        inter, a, b = (np.asarray(v, dtype=np.float64) for v in (inter, psize, tsize))
        both_empty = (a + b) == 0
        if self.name == "dice":
            s = 2.0 * inter / np.maximum(a + b, 1.0)
        else:
            iou = inter / np.maximum(a + b - inter, 1.0)
            # map_iou with one object per row: a hit at every threshold the IoU is above
            s = iou if self.name == "iou" else (iou[..., None] > self.threshold_values()).mean(-1)
        return np.where(both_empty, self.empty, s)

    def component_score(self, pred: np.ndarray, true: np.ndarray) -> float:
        """``map_iou`` of one binary mask pair with 8-connected components as objects."""
        p_lab, n_p = ndimage.label(pred, structure=_EIGHT)
        t_lab, n_t = ndimage.label(true, structure=_EIGHT)
        if n_p == 0 and n_t == 0:
            return self.empty
        if n_p == 0 or n_t == 0:
            return 0.0
        both = np.bincount(p_lab.ravel() * (n_t + 1) + t_lab.ravel(),
                           minlength=(n_p + 1) * (n_t + 1)).reshape(n_p + 1, n_t + 1)
        inter = both[1:, 1:].astype(np.float64)
        area_p, area_t = both[1:, :].sum(1), both[:, 1:].sum(0)
        iou = inter / (area_p[:, None] + area_t[None, :] - inter)
        out = []
        for t in self.threshold_values():  # above 0.5 each object matches at most one other
            tp = int(np.count_nonzero(iou > t))
            out.append(tp / (n_p + n_t - tp))
        return float(np.mean(out))

    # ------------------------------------------------------------------ tables

    def table_labels(self, pred, true, num_classes: int, *, classes=None, ignore=None) -> MetricTable:
        """Score label maps ``[N, H, W]`` (or one ``[H, W]``); ``classes`` get rows (default
        :meth:`scored`: the bound classes, else 1..K-1).

        Void pixels are left out of both masks: truth pixels valued :data:`VOID` and those ``ignore``
        (bool, shape of ``true``) marks.
        """
        pred, true = np.asarray(pred), np.asarray(true)
        if pred.shape != true.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from truth shape {true.shape}")
        if pred.ndim == 2:
            pred, true = pred[None], true[None]
            ignore = None if ignore is None else np.asarray(ignore)[None]
        if pred.ndim != 3:
            raise ValueError(f"expected label maps [N, H, W], got shape {pred.shape}")
        if ignore is not None and np.shape(ignore) != true.shape:
            raise ValueError(f"ignore mask shape {np.shape(ignore)} differs from truth shape {true.shape}")
        classes = self.scored(num_classes) if classes is None else [int(k) for k in classes]
        full = _confusion(pred, true, num_classes, ignore)  # [N, pred class, true class]
        inter = np.diagonal(full, axis1=1, axis2=2)[:, classes]
        psize, tsize = full.sum(axis=2)[:, classes], full.sum(axis=1)[:, classes]
        rows = None
        if self.needs_masks:
            voids = [_void(t, v, num_classes) for t, v in zip(true, ignore if ignore is not None else [None] * len(pred))]
            rows = np.array([[self.component_score(_keep(p == k, v), _keep(t == k, v)) for k in classes]
                             for p, t, v in zip(pred, true, voids)],
                            dtype=np.float64).reshape(len(pred), len(classes))
        return MetricTable(self, inter, psize, tsize, tuple(classes), rows)

    def table_masks(self, pred, true, *, ignore=None, classes=None) -> MetricTable:
        """Score binary masks ``[N, K, H, W]`` (multilabel; classes may overlap), void pixels left out."""
        pred, true = np.asarray(pred).astype(bool), np.asarray(true).astype(bool)
        if pred.shape != true.shape or pred.ndim != 4:
            raise ValueError(f"expected masks [N, K, H, W] of one shape, got {pred.shape} and {true.shape}")
        if ignore is not None:
            keep = ~np.asarray(ignore, dtype=bool)[:, None]
            pred, true = pred & keep, true & keep
        inter = np.count_nonzero(pred & true, axis=(2, 3))
        psize, tsize = np.count_nonzero(pred, axis=(2, 3)), np.count_nonzero(true, axis=(2, 3))
        rows = None
        if self.needs_masks:
            rows = np.array([[self.component_score(p, t) for p, t in zip(pi, ti)] for pi, ti in zip(pred, true)],
                            dtype=np.float64).reshape(inter.shape)
        classes = tuple(range(inter.shape[1])) if classes is None else tuple(int(k) for k in classes)
        return MetricTable(self, inter, psize, tsize, classes, rows)


def _void(true: np.ndarray, ignore, num_classes: int):
    """The void pixels of one truth map: :data:`VOID` labels and ``ignore`` (None when there are none)."""
    v = (true == VOID) if num_classes <= VOID else np.zeros(true.shape, bool)
    if ignore is not None:
        v |= np.asarray(ignore, dtype=bool)
    return v if v.any() else None


def _keep(mask: np.ndarray, void) -> np.ndarray:
    return mask if void is None else mask & ~void


def _confusion(pred: np.ndarray, true: np.ndarray, num_classes: int, ignore=None) -> np.ndarray:
    """Per-image confusion matrices ``[N, pred class, true class]``, void pixels (``ignore``, and truth
    labels :data:`VOID`) left out."""
    void_label = num_classes <= VOID  # a truth label VOID is void, not a class
    for name, arr in (("prediction", pred), ("truth", true)):
        top = arr.max() if arr.size else 0
        if name == "truth" and void_label and top == VOID:
            top = arr[arr != VOID].max(initial=0)
        if arr.size and (arr.min() < 0 or top >= num_classes):
            raise ValueError(f"{name} labels must lie in 0..{num_classes - 1}"
                             + (f" (or {VOID}: void)" if name == "truth" and void_label else ""))
    n, c = pred.shape[0], num_classes + 1  # one more class: the void pixels, dropped at the end
    out = np.zeros((n, c, c), dtype=np.int64)
    per = max(1, _CHUNK_PIXELS // max(1, pred[0].size))
    for s in range(0, n, per):
        p, t = pred[s:s + per].astype(np.intp), true[s:s + per].astype(np.intp)
        v = (t == VOID) if void_label else None
        if ignore is not None:
            v = np.asarray(ignore[s:s + per], dtype=bool) | (False if v is None else v)
        if v is not None and v.any():
            p, t = np.where(v, num_classes, p), np.where(v, num_classes, t)
        m = len(p)
        pairs = p.reshape(m, -1) * c + t.reshape(m, -1) + (np.arange(m, dtype=np.intp) * c * c)[:, None]
        out[s:s + m] = np.bincount(pairs.ravel(), minlength=m * c * c).reshape(m, c, c)
    return out[:, :num_classes, :num_classes]


@dataclass
class MetricTable:
    """Per-image, per-class counts and row scores under one :class:`Metric`.

    ``inter``, ``psize`` (prediction), ``tsize`` (truth) are ``int [N, C]`` over the scored
    ``classes``; ``rows`` the row scores ``[N, C]``.  Index it with image positions to take a subset;
    :meth:`concat` joins tables of one metric (e.g. the folds' OOF).
    """

    metric: Metric
    inter: np.ndarray
    psize: np.ndarray
    tsize: np.ndarray
    classes: tuple[int, ...]
    _rows: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.inter)

    def __getitem__(self, idx) -> MetricTable:
        idx = np.atleast_1d(np.arange(len(self))[idx])
        return MetricTable(self.metric, self.inter[idx], self.psize[idx], self.tsize[idx], self.classes,
                           None if self._rows is None else self._rows[idx])

    @staticmethod
    def concat(tables: list[MetricTable]) -> MetricTable:
        if not tables:
            raise ValueError("nothing to join: no tables")
        first = tables[0]
        if any(t.metric != first.metric or t.classes != first.classes for t in tables):
            raise ValueError("tables of different metrics or classes cannot be joined")
        rows = None if first._rows is None else np.concatenate([t._rows for t in tables])
        return MetricTable(first.metric, *(np.concatenate([getattr(t, a) for t in tables])
                                           for a in ("inter", "psize", "tsize")), first.classes, rows)

    @property
    def rows(self) -> np.ndarray:
        """Each ``<image, class>`` row's own score ``float [N, C]`` (per dataset: for inspection only)."""
        if self._rows is None:
            self._rows = self.metric.from_counts(self.inter, self.psize, self.tsize)
        return self._rows

    @property
    def per_class(self) -> np.ndarray:
        """Score of each class ``[C]``: its rows' mean, or per dataset its summed counts' score."""
        if not len(self):
            raise ValueError("nothing to score: no images")
        if self.metric.per == "dataset":
            return self.metric.from_counts(self.inter.sum(0), self.psize.sum(0), self.tsize.sum(0))
        return self.rows.mean(axis=0)

    @property
    def per_image(self) -> np.ndarray:
        """Mean over each image's classes ``[N]`` (per dataset: of the rows' own scores)."""
        return self.rows.mean(axis=1)

    @property
    def score(self) -> float:
        """The competition's score: the mean of :attr:`per_class` (= the mean over rows or images)."""
        return float(self.per_class.mean())
