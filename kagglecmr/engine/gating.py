"""Empty-mask gating: drop a class from an image when the evidence for it is weak, tuned on OOF.

Where most ``<image, class>`` rows are empty (Severstal 85 %, SIIM-ACR 78 %), a few small false positives
on empty images cost more than any boundary: under the usual metric an empty truth with an empty
prediction scores 1, with one stray pixel 0.  A *gate* decides, per image and class, whether the
class's mask is kept at all; a class that is not kept becomes background (0) in that image.  Two kinds,
alone or together (a class is kept only when every part of its gate says so):

``{"top": T, "bot": B, "min_area": A}``  the SIIM-ACR winners' *triplet*
    keep class ``k`` only if its maximum probability in the image is ``>= T`` **and** at least ``A``
    pixels have probability ``>= B``.  In a softmax task the kept mask stays the **argmax mask** of
    ``k`` (postprocessed by the component rule): the triplet only decides keep or drop, so the
    classes stay mutually exclusive.  (SIIM's sigmoid model also took ``prob >= B`` as the mask.)
    Probabilities and areas are those of the model's input size (the OOF probabilities'), where the
    gate was tuned, whatever the image's own size.
``{"head": H}``  the image-level classification head (``model.cls_head``)
    keep class ``k`` only if the head's probability that ``k`` is present is ``>= H``.

A gate lives in the postprocessing plan beside the class's component rule
(:mod:`kagglecmr.engine.postprocess`): ``{"1": {"kind": "largest", "gate": {"top": 0.8, "bot": 0.5,
"min_area": 46}}}``.  Dropping a whole class and removing some of its components commute, so the order
does not matter.

:func:`tune_gates` searches each class's gate on a small grid against the competition's metric
(:class:`~kagglecmr.formats.competition_metric.Metric`) from the OOF counts alone (dropping a row zeroes
its predicted size and overlap), so the search is exact and fast for every metric.  A class keeps no gate
unless one improves its OOF score by more than ``epsilon``: the plan never lowers the OOF it is tuned on.
That OOF is then optimistic (the gate was chosen on it); with the images' folds (``groups``) it also
returns the **nested** estimate (each fold gated by the gate tuned on the other folds): the honest one.
Pure numpy; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kagglecmr.formats.competition_metric import Metric, MetricTable
from kagglecmr.utils.errors import ConfigError

TRIPLET = ("top", "bot", "min_area")
KEYS = (*TRIPLET, "head")
EPSILON = 1e-4  # a gate must beat "no gate" by more than this (class score) to be chosen
TOPS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # a softmax argmax can win with little over 1/K
BOTS = (0.3, 0.5, 0.7)
AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032)  # of the image's pixels
HEADS = tuple(round(0.05 * i, 2) for i in range(1, 20))
_CHUNK_PIXELS = 1 << 24


# --------------------------------------------------------------------------------------------- rules


def _prob(v, where: str, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not 0 <= v <= 1:
        raise ConfigError(f"{where}: bad {key} {v!r} (expected a probability 0..1)")
    return float(v)


def check_gate(gate, where: str = "gate") -> dict:
    """A normalised copy of one gate (see the module docstring) or ConfigError(``where: ...``)."""
    if not isinstance(gate, dict) or not gate:
        raise ConfigError(f"{where}: expected an object like {{\"top\": 0.8, \"bot\": 0.5, \"min_area\": 40}} "
                          f"or {{\"head\": 0.4}}, got {gate!r}")
    extra = sorted(set(gate) - set(KEYS))
    if extra:
        raise ConfigError(f"{where}: unexpected key(s) {', '.join(map(repr, extra))} (known: {', '.join(KEYS)})")
    given = [k for k in TRIPLET if k in gate]
    if given and len(given) != 3:
        raise ConfigError(f"{where}: the triplet needs top, bot and min_area together (got {', '.join(given)})")
    out = {}
    if given:
        area = gate["min_area"]
        if isinstance(area, bool) or not isinstance(area, (int, np.integer)) or area < 0:
            raise ConfigError(f"{where}: bad min_area {area!r} (expected an integer >= 0)")
        out = {"top": _prob(gate["top"], where, "top"), "bot": _prob(gate["bot"], where, "bot"), "min_area": int(area)}
    if "head" in gate:
        out["head"] = _prob(gate["head"], where, "head")
    return out


def describe_gate(gate: dict) -> str:
    """``top 0.80, 46 px >= 0.50`` / ``head 0.35`` / both joined by `` & ``."""
    parts = []
    if "top" in gate:
        area = f", {gate['min_area']} px >= {gate['bot']:.2f}" if gate["min_area"] else ""
        parts.append(f"top {gate['top']:.2f}{area}")
    if "head" in gate:
        parts.append(f"head {gate['head']:.2f}")
    return " & ".join(parts) or "none"


def plan_gates(plan: dict | None) -> dict[int, dict]:
    """``{class: gate}`` of a (validated) postprocessing plan's gated classes."""
    return {int(k): r["gate"] for k, r in (plan or {}).items() if isinstance(r, dict) and r.get("gate")}


def with_gates(plan: dict, gates: dict[int, dict]) -> dict:
    """``plan`` with each class's ``gate`` replaced by ``gates`` (absent: no gate)."""
    out = {}
    for key, rule in plan.items():
        rule = {k: v for k, v in rule.items() if k != "gate"}
        out[key] = rule | ({"gate": dict(gates[int(key)])} if gates.get(int(key)) else {})
    for cls in sorted(set(gates) - {int(k) for k in plan}):
        if gates[cls]:
            out[str(cls)] = {"kind": "none", "gate": dict(gates[cls])}
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


# --------------------------------------------------------------------------------------------- evidence


@dataclass
class GateStats:
    """What gates look at, per image and scored class: ``maxp`` ``[N, C]`` (maximum probability),
    ``area`` ``[N, C, len(bots)]`` (pixels with probability ``>= bots[j]``), ``presence`` ``[N, C]`` (the
    cls head's probabilities, or None), ``pixels`` (one image's pixel count)."""

    classes: tuple[int, ...]
    maxp: np.ndarray
    bots: tuple[float, ...]
    area: np.ndarray
    presence: np.ndarray | None
    pixels: int

    def __len__(self) -> int:
        return len(self.maxp)

    def subset(self, idx) -> GateStats:
        return GateStats(self.classes, self.maxp[idx], self.bots, self.area[idx],
                         None if self.presence is None else self.presence[idx], self.pixels)

    def area_at(self, bot: float) -> np.ndarray:
        j = [i for i, b in enumerate(self.bots) if abs(b - bot) < 1e-9]
        if not j:
            raise ValueError(f"gate bot {bot} was not counted (counted: {list(self.bots)})")
        return self.area[:, :, j[0]]


def gate_stats(probs, classes, *, bots=BOTS, presence=None) -> GateStats:
    """Evidence of probability maps ``[N, K, H, W]`` (softmax with the background channel 0, or one
    sigmoid channel per class) for the channels ``classes``; ``presence`` ``[N, len(classes)]`` or None."""
    probs = np.asarray(probs) if not isinstance(probs, np.ndarray) else probs
    if probs.ndim != 4:
        raise ValueError(f"expected probabilities [N, K, H, W], got shape {probs.shape}")
    classes, bots = tuple(int(k) for k in classes), tuple(float(b) for b in bots)
    n = len(probs)
    maxp = np.zeros((n, len(classes)), np.float32)
    area = np.zeros((n, len(classes), len(bots)), np.int64)
    per = max(1, _CHUNK_PIXELS // max(1, int(np.prod(probs.shape[1:]))))
    for s in range(0, n, per):
        p = np.asarray(probs[s:s + per][:, list(classes)], dtype=np.float32)
        maxp[s:s + per] = p.max(axis=(2, 3)) if p.size else 0
        for j, b in enumerate(bots):
            area[s:s + per, :, j] = np.count_nonzero(p >= b, axis=(2, 3))
    if presence is not None:
        presence = np.asarray(presence, dtype=np.float32)
        if presence.shape != (n, len(classes)):
            raise ValueError(f"presence shape {presence.shape}, expected {(n, len(classes))}")
    return GateStats(classes, maxp, bots, area, presence, int(np.prod(probs.shape[2:])))


def keep_matrix(gates: dict[int, dict], stats: GateStats) -> np.ndarray:
    """bool ``[N, C]``: whether each image keeps each class under ``gates`` (``{class: gate}``)."""
    keep = np.ones(stats.maxp.shape, dtype=bool)
    for c, cls in enumerate(stats.classes):
        gate = gates.get(cls)
        if gate:
            keep[:, c] = _keep(gate, stats, c)
    return keep


def _keep(gate: dict, stats: GateStats, c: int) -> np.ndarray:
    keep = np.ones(len(stats), dtype=bool)
    if "top" in gate:
        keep &= (stats.maxp[:, c] >= gate["top"]) & (stats.area_at(gate["bot"])[:, c] >= gate["min_area"])
    if "head" in gate:
        if stats.presence is None:
            raise ConfigError(f"class {stats.classes[c]}: its gate needs the cls head's probabilities, and the "
                              f"models have no head (model.cls_head)")
        keep &= stats.presence[:, c] >= gate["head"]
    return keep


def gated_table(table: MetricTable, keep: np.ndarray) -> MetricTable:
    """``table`` with the prediction of every dropped row (``keep`` False) emptied."""
    keep = np.asarray(keep, dtype=bool)
    rows = None
    if table.metric.needs_masks:  # row scores that came from the masks: a dropped row scores as an empty one
        rows = np.where(keep, table.rows, table.metric.from_counts(0, 0, table.tsize))
    return MetricTable(table.metric, table.inter * keep, table.psize * keep, table.tsize, table.classes, rows)


def gate_labels(labels, keep: np.ndarray, classes) -> list | np.ndarray:
    """Label maps (``[N, H, W]`` or a list of ``[H, W]``) with each dropped class set to background (0)."""
    out = [np.array(m, copy=True) for m in labels]
    for i, c in zip(*np.nonzero(~np.asarray(keep, dtype=bool))):
        out[i][out[i] == classes[c]] = 0
    return np.stack(out) if isinstance(labels, np.ndarray) else out


# --------------------------------------------------------------------------------------------- tuning


def candidate_gates(pixels: int, *, kinds=("triplet",), tops=TOPS, bots=BOTS, area_fractions=AREA_FRACTIONS,
                    heads=HEADS) -> list[dict]:
    """The grid, "no gate" (``{}``) first: triplets, head thresholds, and (with both kinds) every pair."""
    areas = sorted({int(round(f * pixels)) for f in area_fractions})
    triplets = [{"top": float(t), "bot": float(b), "min_area": a} for a in areas for t in sorted(tops)
                for b in (sorted(bots) if a else sorted(bots)[:1])]  # with no area, bot plays no part
    heads = [{"head": float(h)} for h in sorted(heads)]
    out: list[dict] = [{}]
    out += triplets if "triplet" in kinds else []
    out += heads if "head" in kinds else []
    if "triplet" in kinds and "head" in kinds:
        out += [t | h for t in triplets for h in heads]
    return out


def _class_scores(metric: Metric, keep: np.ndarray, table: MetricTable, c: int) -> np.ndarray:
    """The class's score under each candidate's keep vector (``keep`` ``[M, N]``) -> ``[M]``."""
    inter, psize, tsize = (getattr(table, a)[:, c].astype(np.float64) for a in ("inter", "psize", "tsize"))
    if metric.per == "dataset":
        return metric.from_counts(keep @ inter, keep @ psize, np.full(len(keep), tsize.sum()))
    kept, dropped = table.rows[:, c], metric.from_counts(0, 0, tsize)
    return dropped.mean() + keep @ (kept - dropped) / max(1, len(kept))


def _best(scores: np.ndarray, dropped: np.ndarray, epsilon: float) -> int:
    """Index of the best candidate: highest score, then fewest dropped rows, then grid order; 0 ("no
    gate") unless the best beats it by more than ``epsilon``."""
    order = np.lexsort((np.arange(len(scores)), dropped, -np.round(scores, 12)))
    return int(order[0]) if scores[order[0]] - scores[0] > epsilon else 0


def _choose(table: MetricTable, stats: GateStats, cands: list[dict], epsilon: float) -> dict[int, dict]:
    gates: dict[int, dict] = {}
    for c, cls in enumerate(stats.classes):
        keep = np.stack([_keep(g, stats, c) for g in cands])
        j = _best(_class_scores(table.metric, keep, table, c), (~keep).sum(1), epsilon)
        gates[cls] = dict(cands[j])
    return gates


@dataclass
class GateResult:
    """:func:`tune_gates`'s answer: the gates (``{class: gate}``, ``{}`` = none), per-class scores before,
    after (optimistic: chosen on the same OOF) and nested (honest; None without folds), and the grid size."""

    gates: dict[int, dict]
    before: np.ndarray
    after: np.ndarray
    nested: np.ndarray | None
    candidates: int
    metric: Metric

    def table(self, names=None) -> str:
        """Aligned text lines: class, gate, OOF before/after (and nested), ``*`` where the gate changed it."""
        head = f"{'class':>12}  {'gate':<34} {'before':>8} {'after':>8}" + (f" {'nested':>8}" if self.nested is not None
                                                                            else "")
        lines = [head]
        for c, cls in enumerate(self.gates):
            name = names[cls] if names is not None and cls < len(names) else str(cls)
            nested = f" {self.nested[c]:>8.4f}" if self.nested is not None else ""
            mark = " *" if self.gates[cls] else ""
            lines.append(f"{name:>12}  {describe_gate(self.gates[cls]):<34} {self.before[c]:>8.4f} "
                         f"{self.after[c]:>8.4f}{nested}{mark}")
        nested = f" {self.nested.mean():>8.4f}" if self.nested is not None else ""
        lines.append(f"{'mean':>12}  {'':<34} {self.before.mean():>8.4f} {self.after.mean():>8.4f}{nested}")
        return "\n".join(lines)


def tune_gates(table: MetricTable, stats: GateStats, *, kinds=("triplet",), groups=None, epsilon: float = EPSILON,
               **grid) -> GateResult:
    """Choose each class's gate on OOF: ``table`` scores the OOF masks (after the component rules) under the
    competition's metric, ``stats`` their probabilities (:func:`gate_stats`, same images and classes).
    ``kinds``: ``triplet`` and/or ``head``; ``groups`` (each image's fold) adds the nested estimate; ``grid``
    overrides :func:`candidate_gates`' values (``tops``, ``bots``, ``area_fractions``, ``heads``)."""
    if len(table) != len(stats) or table.classes != stats.classes:
        raise ValueError(f"table ({len(table)} images, classes {table.classes}) and stats ({len(stats)} images, "
                         f"classes {stats.classes}) differ")
    if not len(table):
        raise ValueError("nothing to tune: no images")
    kinds = tuple(kinds)
    if "head" in kinds and stats.presence is None:
        raise ConfigError("gating: the head's threshold needs models trained with model.cls_head: true")
    grid.setdefault("bots", stats.bots)
    cands = candidate_gates(stats.pixels, kinds=kinds, **grid)
    gates = _choose(table, stats, cands, epsilon)
    after = gated_table(table, keep_matrix(gates, stats)).per_class
    nested = None
    if groups is not None:
        groups = np.asarray(groups)
        keep = np.ones(stats.maxp.shape, dtype=bool)
        for g in np.unique(groups):
            inner, outer = np.flatnonzero(groups != g), np.flatnonzero(groups == g)
            if len(inner):
                keep[outer] = keep_matrix(_choose(table[inner], stats.subset(inner), cands, epsilon),
                                          stats.subset(outer))
        nested = gated_table(table, keep).per_class
    return GateResult(gates, table.per_class, after, nested, len(cands), table.metric)
