"""Per-class connected-component post-processing, tuned on out-of-fold predictions.

A *plan* maps a foreground class (as a string, ``"1"``..``"num_classes-1"``) to a rule::

    {"kind": "none"}                   keep the class as predicted
    {"kind": "largest"}                keep only the largest connected component
    {"kind": "min_area", "area": A}    drop components smaller than A pixels (may empty the class)

and may carry a ``"gate"`` (empty-mask gating, :mod:`kagglecmr.engine.gating`: keep the class in an image
only when its probabilities or the cls head say so), which needs the probabilities and is applied there.

Components are **8-connected** (diagonal neighbours touch).  Pixels removed from class ``k``
become background (0); other classes are never changed, so when class 0 is not scored the classes
are independent under the metric (every metric's score is the mean of its per-class scores) and each
class's rule can be tuned on its own; when class 0 is scored (its rows are in the submission) the
rules are chosen one class after another on the whole score.  Void truth pixels count for no class.

With overlapping classes (``task: multilabel``) a plan may also hold ``"thresholds": {"1": 0.45, ...}``,
each class's sigmoid threshold (:mod:`kagglecmr.engine.multilabel_post`); its rules act on each class's own mask.

A plan is plain JSON (``save_plan`` / ``load_plan``); invalid plans raise
:class:`~kagglecmr.utils.errors.ConfigError` with a one-line message naming the file or class.
Pure numpy + OpenCV; no torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from kagglecmr.engine.gating import check_gate, describe_gate
from kagglecmr.formats.competition_metric import Metric
from kagglecmr.formats.multilabel import THRESHOLDS, check_thresholds
from kagglecmr.utils.errors import ConfigError
from kagglecmr.utils.io import atomic_write_json

CONNECTIVITY = 8
KINDS = ("none", "largest", "min_area")
EPSILON = 1e-4  # a rule must beat "none" by more than this (the class's score under the metric) to be chosen
DEFAULT_AREAS = (5, 10, 20, 40, 80)


# --------------------------------------------------------------------------------------------
# validation


def _check_rule(rule, where: str) -> dict:
    """Return a normalised copy of one rule or raise ConfigError(``where: ...``)."""
    if not isinstance(rule, dict):
        raise ConfigError(f"{where}: rule must be an object like {{\"kind\": \"largest\"}}, got {rule!r}")
    if "gate" in rule:  # empty-mask gating beside the component rule
        return _check_rule({k: v for k, v in rule.items() if k != "gate"}, where) | \
            {"gate": check_gate(rule["gate"], f"{where}: gate")}
    kind = rule.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r} (expected one of: {', '.join(KINDS)})")
    allowed = {"kind", "area"} if kind == "min_area" else {"kind"}
    extra = sorted(set(rule) - allowed)
    if extra:
        raise ConfigError(f"{where}: unexpected key(s) {', '.join(map(repr, extra))} for kind {kind!r}")
    if kind != "min_area":
        return {"kind": kind}
    if "area" not in rule:
        raise ConfigError(f"{where}: kind 'min_area' needs an integer 'area' >= 1")
    area = rule["area"]
    if isinstance(area, bool) or not isinstance(area, (int, np.integer)) or area < 1:
        raise ConfigError(f"{where}: bad area {area!r} (expected an integer >= 1)")
    return {"kind": "min_area", "area": int(area)}


def validate_plan(plan, num_classes: int | None = None, *, source: str | os.PathLike | None = None) -> dict:
    """Return a normalised copy of ``plan`` (keys ``"1"``, ``"2"``... in order) or raise ConfigError.

    Keys may be ints or strings of positive integers; with ``num_classes`` they must be below it.
    ``source`` (a file name) starts every message; otherwise messages start with ``plan``.
    """
    label = str(source) if source is not None else "plan"
    if not isinstance(plan, dict):
        raise ConfigError(f"{label}: a plan must be a JSON object mapping class -> rule, got {type(plan).__name__}")
    out: dict[str, dict] = {}
    for key, rule in plan.items():
        if key == THRESHOLDS:  # task multilabel: each class's probability threshold
            continue
        text = str(key).strip()
        if isinstance(key, bool) or not text.isdigit() or int(text) < 1:
            raise ConfigError(f"{label}: bad class key {key!r} (expected a foreground class number >= 1)")
        cls = int(text)
        if num_classes is not None and cls >= num_classes:
            raise ConfigError(f"{label}: class {cls} out of range (num_classes={num_classes})")
        if str(cls) in out:
            raise ConfigError(f"{label}: class {cls} given twice")
        out[str(cls)] = _check_rule(rule, f"{label}: class {cls}")
    out = dict(sorted(out.items(), key=lambda kv: int(kv[0])))
    if THRESHOLDS in plan:
        try:
            out[THRESHOLDS] = check_thresholds(plan[THRESHOLDS], None if num_classes is None else num_classes - 1)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
    return out


# --------------------------------------------------------------------------------------------
# applying


def _filter_mask(mask: np.ndarray, rule: dict) -> np.ndarray:
    """Boolean mask of the pixels of ``mask`` (uint8 0/1, 2-D) that the rule keeps."""
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=CONNECTIVITY, ltype=cv2.CV_32S)
    if n == 1 or (n == 2 and rule["kind"] == "largest"):  # nothing to choose between
        return mask.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, dtype=bool)
    if rule["kind"] == "largest":
        keep[1 + int(np.argmax(areas))] = True  # ties: the first component in raster order
    else:
        keep[1:] = areas >= rule["area"]
    return keep[comp]


def apply_plan(labels: np.ndarray, plan: dict, num_classes: int = 4) -> np.ndarray:
    """Apply ``plan`` to label maps ``[N, H, W]`` or ``[H, W]``; returns a new array (same dtype).

    Pixels that a class's rule removes become background (0).  Classes without a rule, and
    label values >= ``num_classes``, are left untouched.  Idempotent.
    """
    plan = validate_plan(plan, num_classes)
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be [H, W] or [N, H, W], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}")
    out = labels.copy()
    batch = out[None] if out.ndim == 2 else out
    for key, rule in plan.items():
        if key == THRESHOLDS or rule["kind"] == "none":
            continue
        cls = int(key)
        is_cls = batch == cls
        for i in np.flatnonzero(is_cls.any(axis=(1, 2))):
            mask = is_cls[i]
            kept = _filter_mask(mask.view(np.uint8), rule)
            batch[i][mask & ~kept] = 0
    return out


# --------------------------------------------------------------------------------------------
# tuning


def rule_name(rule: dict) -> str:
    name = f"min_area {rule['area']}" if rule["kind"] == "min_area" else rule["kind"]
    return f"{name}, gate {describe_gate(rule['gate'])}" if rule.get("gate") else name


def describe_plan(plan: dict) -> str:
    """One line, e.g. ``1: largest, 2: none, 3: min_area 20``."""
    plan = validate_plan(plan)
    text = ", ".join(f"{k}: {rule_name(r)}" for k, r in plan.items() if k != THRESHOLDS)
    if THRESHOLDS in plan:
        text += ("; " if text else "") + "thresholds " + ", ".join(f"{k}: {t:g}" for k, t in plan[THRESHOLDS].items())
    return text or "(empty plan)"


def candidate_rules(areas=DEFAULT_AREAS) -> list[dict]:
    """``none``, then ``min_area`` by increasing area, then ``largest``.

    The order is the tie-break in :func:`tune_plan`: among equally good rules the earlier
    (less destructive) one wins.
    """
    checked = sorted({int(_check_rule({"kind": "min_area", "area": a}, "areas")["area"]) for a in areas})
    return [{"kind": "none"}] + [{"kind": "min_area", "area": a} for a in checked] + [{"kind": "largest"}]


def tune_plan(pred_labels: np.ndarray, true_labels: np.ndarray, num_classes: int = 4, areas=DEFAULT_AREAS,
              *, epsilon: float = EPSILON, metric: Metric | None = None):
    """Choose each foreground class's rule to maximise ``metric`` (default: mean Dice over rows) on
    (out-of-fold) predictions; void truth pixels (label ``VOID``) count for no class.

    Returns ``(plan, before, after, table)``: the plan (every class, ``none`` included), the
    metric's score before and after applying it, and the candidate scores as a list of dicts
    ``{"class", "rule", "kind", "area", "score", "delta", "chosen"}`` (``score``: the class's
    score, or with class 0 scored the whole score; ``delta`` is relative to ``none``).  A rule
    replaces ``none`` only when it improves by more than ``epsilon``.  Without class 0 among the
    scored classes, classes do not interact under the metric, so choosing class by class is exact;
    with it, each class's rule is chosen in turn on the whole score, the earlier classes' rules applied.
    """
    metric = metric or Metric()

    pred = np.asarray(pred_labels)
    true = np.asarray(true_labels)
    if pred.shape != true.shape:
        raise ValueError(f"pred_labels {pred.shape} and true_labels {true.shape} differ in shape")
    if pred.ndim == 2:
        pred, true = pred[None], true[None]
    if pred.ndim != 3 or pred.shape[0] == 0:
        raise ValueError(f"expected label maps [N, H, W] with N >= 1, got shape {np.asarray(pred_labels).shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")

    classes = [str(k) for k in range(1, num_classes)]
    candidates = candidate_rules(areas)
    scored = metric.scored(num_classes)

    def per_class(labels) -> np.ndarray:  # [foreground classes]; NaN for a class not scored
        t = metric.table_labels(labels, true, num_classes)
        got = dict(zip(t.classes, t.per_class))
        return np.array([got.get(int(k), np.nan) for k in classes])

    if 0 in scored:  # removed pixels become class 0, a scored class: one class after another, on the whole score
        current, scores = pred, []
        for key in classes:
            outs = [current if r["kind"] == "none" else apply_plan(current, {key: r}, num_classes) for r in candidates]
            col = np.array([metric.table_labels(o, true, num_classes).score for o in outs])
            scores.append(col)
            current = outs[_pick(col, epsilon)]
        scores = np.stack(scores, 1)  # [candidates, classes]
    else:  # each candidate applied to every class at once: class k's column depends only on class k's rule
        scores = np.stack([per_class(pred if rule["kind"] == "none" else
                                     apply_plan(pred, {k: rule for k in classes}, num_classes)) for rule in candidates])

    plan: dict[str, dict] = {}
    rows: list[dict] = []
    for c, key in enumerate(classes):
        base = scores[0, c]
        best = _pick(scores[:, c], epsilon)
        plan[key] = dict(candidates[best])
        for j, rule in enumerate(candidates):
            rows.append({
                "class": int(key),
                "rule": rule_name(rule),
                "kind": rule["kind"],
                "area": rule.get("area"),
                "score": float(scores[j, c]),
                "delta": float(scores[j, c] - base),
                "chosen": j == best,
            })
    before = metric.table_labels(pred, true, num_classes).score
    after = metric.table_labels(apply_plan(pred, plan, num_classes), true, num_classes).score
    return plan, before, after, rows


def _pick(col: np.ndarray, epsilon: float) -> int:
    """The best candidate of a score column (first of equal maxima: the least destructive) when it beats
    ``none`` (index 0) by more than ``epsilon``, else 0; a class not scored (NaN) keeps ``none``."""
    if np.isnan(col).all():
        return 0
    best = int(np.nanargmax(col))
    return best if col[best] - col[0] > epsilon else 0


def format_table(table: list[dict]) -> str:
    """The tuning table as aligned text lines (``*`` marks the chosen rule)."""
    lines = [f"{'class':>5}  {'rule':<12} {'score':>9} {'delta':>9}"]
    for row in table:
        mark = " *" if row["chosen"] else ""
        lines.append(f"{row['class']:>5}  {row['rule']:<12} {row['score']:>9.5f} {row['delta']:>+9.5f}{mark}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# files


def save_plan(plan: dict, path: str | os.PathLike) -> Path:
    """Validate and write ``plan`` as JSON (atomically)."""
    plan = validate_plan(plan, source=path)
    return atomic_write_json(path, plan)


def load_plan(path: str | os.PathLike, num_classes: int | None = None) -> dict:
    """Read and validate a plan written by :func:`save_plan`; ConfigError names the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: plan file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read plan file ({exc.__class__.__name__}: {exc})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return validate_plan(obj, num_classes, source=path)
