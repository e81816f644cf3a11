"""Empty-mask gating as a step of ``ensemble``'s postprocessing (``--gate``): tuned on the OOF
probabilities after the component rules, saved in the plan, applied to every split.

``--gate`` names what is tuned: ``triplet`` (max probability, area above a lower threshold), ``head`` (the
cls head's threshold; runs trained with ``model.cls_head: true``), both (``triplet,head``), or ``none``.
Left out, the head is tuned when a run has one and nothing otherwise, so runs without a head ensemble
exactly as before.  Each class keeps no gate unless one raises its OOF score; the printed table gives the
OOF per class before and after (optimistic: chosen on that OOF) and the nested estimate (each fold gated
by what the other folds chose: honest).  See :mod:`kagglecmr.engine.gating`.
"""

from __future__ import annotations

import numpy as np

from kagglecmr.engine.gating import (
    GateResult,
    gate_labels,
    gate_stats,
    keep_matrix,
    plan_gates,
    tune_gates,
    with_gates,
)
from kagglecmr.engine.presence import has_presence, runs_presence, runs_presence_oof
from kagglecmr.formats.competition_metric import Metric
from kagglecmr.utils.errors import KaggleCMRError

KINDS = ("triplet", "head")


def gate_kinds(spec: str | None, runs) -> tuple[str, ...]:
    """What ``--gate`` asks to tune (see the module docstring)."""
    heads = any(r.models and all(has_presence(m) for m in r.models.values()) for r in runs)
    if spec is None:
        return ("head",) if heads else ()
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if parts == ["none"]:
        return ()
    bad = [p for p in parts if p not in KINDS]
    if bad or not parts:
        raise KaggleCMRError(f"--gate {spec}: expected none, triplet, head or triplet,head")
    if "head" in parts and not heads:
        raise KaggleCMRError(f"--gate {spec}: no run has a cls head (train with --set model.cls_head=true)")
    return tuple(k for k in KINDS if k in parts)


def _folds(runs, ids) -> np.ndarray:
    fold_of = {i: f for f, held in runs[0].holdout.items() for i in held}
    return np.array([fold_of.get(i, -1) for i in ids])


def choose_gating(kinds, runs, labelled, oof_probs: np.ndarray, pred: np.ndarray, plan: dict, *, device, passes,
                  weights, batch_size, metric: Metric | None = None, names=None) -> tuple[dict, np.ndarray | None]:
    """Tune the gates of ``kinds`` on the OOF masks ``pred`` (after the component rules) and their
    probabilities, print the per-class table; returns the plan with its gates and the OOF head probabilities."""
    if not kinds:
        return plan, None
    metric = metric or Metric()
    k = oof_probs.shape[1]
    presence = runs_presence_oof(runs, labelled, device, passes, weights, batch_size) if "head" in kinds else None
    table = metric.table_labels(pred, labelled.masks, k)
    stats = gate_stats(oof_probs, range(1, k), presence=presence)
    result = tune_gates(table, stats, kinds=kinds, groups=_folds(runs, labelled.ids))
    print(report(result, kinds, names), flush=True)
    return with_gates(plan, result.gates), presence


def report(result: GateResult, kinds, names=None) -> str:
    """The per-class table and one summary line."""
    nested = "" if result.nested is None else (f"; nested {result.nested.mean():.4f} (each fold gated as the other "
                                                f"folds chose: honest)")
    return (f"gating ({' + '.join(kinds)}; {result.candidates} candidates per class) chosen on OOF {result.metric.label}:"
            f"\n{result.table(names)}\nOOF {result.before.mean():.4f} -> {result.after.mean():.4f} (optimistic: "
            f"chosen on this OOF){nested}")


def presence_of(runs, data, oof: bool, device, passes, weights, batch_size, known=None):
    """A function giving the head's probabilities of the Split ``data`` when called (out of fold with ``oof``;
    ``known``: the OOF ones when already computed), so they are predicted only when a gate needs them."""
    def get():
        if oof:
            return known if known is not None else runs_presence_oof(runs, data, device, passes, weights, batch_size)
        return runs_presence(runs, data.images, device, passes, weights, batch_size)
    return get


def split_keep(plan: dict | None, probs: np.ndarray, presence) -> np.ndarray | None:
    """bool ``[N, K-1]``: which classes each image keeps under the plan's gates (None: the plan has none).
    ``presence``: the head's probabilities, or a function computing them (called only when a gate needs them)."""
    gates = plan_gates(plan)
    if not gates:
        return None
    bots = sorted({g["bot"] for g in gates.values() if "bot" in g}) or [0.5]
    head = any("head" in g for g in gates.values())
    if head and callable(presence):
        presence = presence()
    if head and presence is None:
        raise KaggleCMRError("the postprocessing plan gates on the cls head, and the models have none "
                             "(model.cls_head)")
    return keep_matrix(gates, gate_stats(probs, range(1, probs.shape[1]), bots=bots,
                                         presence=presence if head else None))


def gated(labels, keep: np.ndarray | None):
    """Label maps with every class an image does not keep set to background (as they are when ``keep`` is None)."""
    return labels if keep is None else gate_labels(labels, keep, list(range(1, keep.shape[1] + 1)))
