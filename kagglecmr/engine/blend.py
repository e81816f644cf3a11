"""Blend weights fitted on out-of-fold probabilities: ``ensemble --runs A --runs B --weights auto``.

The weights maximise the dataset's metric (``metric``; by default mean Dice over image x class rows) of
the argmax masks of ``sum_r w_r * p_r`` over the runs' OOF softmax, under ``w >= 0, sum w = 1``
(void truth pixels left out):

* up to :data:`GRID_MAX_RUNS` runs: every point of a simplex grid (step 0.05; 0.1 for 4 runs);
* more runs: Nelder-Mead (``scipy.optimize``) on softmax-parametrised weights, from equal weights.

Ties go to the point closest to equal weights.  A blend fitted on an OOF is scored on that same OOF,
so its number is optimistic; :func:`nested_estimate` gives an honest one: for each fold, weights
fitted on the other folds' OOF score that fold's images.

Pure numpy/scipy: no torch import.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import minimize

from kagglecmr.formats.competition_metric import Metric, MetricTable

GRID_MAX_RUNS = 4


def blend_labels(probs: list[np.ndarray], weights) -> np.ndarray:
    """Argmax masks ``[N, H, W]`` of the weighted mean of per-run probabilities ``[N, K, H, W]``."""
    total = None
    for p, w in zip(probs, weights):
        if w == 0:
            continue
        total = p * np.float32(w) if total is None else total + p * np.float32(w)
    if total is None:
        total = probs[0]
    return total.argmax(1).astype(np.uint8)


def blend_table(probs: list[np.ndarray], weights, masks: np.ndarray, num_classes: int,
                metric: Metric | None = None) -> MetricTable:
    """The metric's table of the blend (``.score``; default metric: mean Dice over rows)."""
    return (metric or Metric()).table_labels(blend_labels(probs, weights), masks, num_classes)


def simplex_grid(n: int, step: float) -> np.ndarray:
    """Every weight vector of ``n`` non-negative multiples of ``step`` summing to 1."""
    m = int(round(1 / step))
    pts = [c for c in itertools.product(range(m + 1), repeat=n - 1) if sum(c) <= m]
    return np.array([[*c, m - sum(c)] for c in pts], dtype=np.float64) / m


def fit_weights(probs: list[np.ndarray], masks: np.ndarray, num_classes: int,
                metric: Metric | None = None) -> tuple[np.ndarray, str]:
    """``(weights, method)`` maximising ``metric`` (default: mean Dice over rows) of the blend on ``masks``."""
    n = len(probs)
    if n == 1:
        return np.ones(1), "single run"
    equal = np.full(n, 1 / n)

    def score(w) -> float:
        return blend_table(probs, w, masks, num_classes, metric).score

    if n <= GRID_MAX_RUNS:
        step = 0.05 if n <= 3 else 0.1
        grid = simplex_grid(n, step)
        scores = np.array([score(w) for w in grid])
        dist = np.abs(grid - equal).sum(1)
        best = np.lexsort((dist, -scores))[0]  # highest score, then closest to equal weights
        return grid[best], f"simplex grid, step {step} ({len(grid)} points)"
    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    simplex = np.vstack([np.zeros(n), np.eye(n)])  # steps of 1 in logit space: the metric is piecewise flat
    res = minimize(lambda z: -score(softmax(z)), np.zeros(n), method="Nelder-Mead",
                   options={"initial_simplex": simplex, "maxiter": 60 * n, "xatol": 1e-3, "fatol": 1e-6})
    w = softmax(res.x)
    if score(w) < score(equal):
        w = equal
    return w, f"Nelder-Mead on softmax weights ({res.nfev} evaluations)"


def nested_estimate(probs: list[np.ndarray], masks: np.ndarray, num_classes: int, groups: np.ndarray,
                    metric: Metric | None = None) -> tuple[MetricTable, list[np.ndarray]]:
    """Honest table of fitted blending: for each fold (``groups``: fold per image), weights fitted on the other
    folds' images score that fold's.  Returns ``(the metric's table over all images, weights per fold)``."""
    tables, per_fold = [], []
    for g in np.unique(groups):
        test = groups == g
        w, _ = fit_weights([p[~test] for p in probs], masks[~test], num_classes, metric)
        tables.append(blend_table([p[test] for p in probs], w, masks[test], num_classes, metric))
        per_fold.append(w)
    return MetricTable.concat(tables), per_fold
