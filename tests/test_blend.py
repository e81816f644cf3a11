"""Blend weights fitted on OOF probabilities (kagglecmr.engine.blend) and ``ensemble --weights auto``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import copy_run

from kagglecmr.engine.blend import blend_table, fit_weights, nested_estimate, simplex_grid
from kagglecmr.formats.metric import dice_table


def _probs_from(labels: np.ndarray, k: int = 4, conf: float = 0.7) -> np.ndarray:
    p = np.full((*labels.shape[:1], k, *labels.shape[1:]), (1 - conf) / (k - 1), np.float32)
    np.put_along_axis(p, labels[:, None].astype(np.int64), conf, axis=1)
    return p


def _truth_and_runs(n_runs: int, seed: int = 0):
    """Truth masks, one run equal to the truth on most pixels but unsure, and confident noisy others
    (so equal weights let the noise win)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((10, 24, 24), np.uint8)
    for i in range(10):
        truth[i, 4 + i % 3:14, 5:15] = 1 + i % 3
    runs = []
    for r in range(n_runs):
        lab = truth.copy()
        noise = rng.random(truth.shape) < (0.05 if r == 0 else 0.5)
        lab[noise] = rng.integers(0, 4, int(noise.sum()))
        runs.append(_probs_from(lab, conf=0.5 if r == 0 else 0.9))
    return truth, runs


def test_simplex_grid_covers_the_simplex():
    g = simplex_grid(3, 0.05)
    assert len(g) == 231 and np.allclose(g.sum(1), 1) and (g >= 0).all()
    assert len(simplex_grid(4, 0.1)) == 286


@pytest.mark.parametrize("n", [2, 3, 5])
def test_fit_weights_favours_the_accurate_run_and_beats_equal_weights(n):
    truth, runs = _truth_and_runs(n)
    w, method = fit_weights(runs, truth, 4)
    assert ("grid" in method) == (n <= 4) and ("Nelder-Mead" in method) == (n > 4)
    assert w.sum() == pytest.approx(1) and (w >= 0).all()
    assert w[0] == w.max() and w[0] > 1 / n
    fitted = blend_table(runs, w, truth, 4).score
    assert fitted >= blend_table(runs, np.full(n, 1 / n), truth, 4).score
    # the fitted blend's score is the metric of its argmax masks
    total = sum(p * x for p, x in zip(runs, w))
    assert fitted == pytest.approx(dice_table(total.argmax(1), truth, 4).mean())


def test_identical_runs_get_equal_weights():
    truth, runs = _truth_and_runs(1)
    w, _ = fit_weights([runs[0], runs[0].copy()], truth, 4)
    assert np.allclose(w, [0.5, 0.5])


def test_nested_estimate_scores_each_fold_with_weights_fitted_elsewhere():
    truth, runs = _truth_and_runs(2)
    groups = np.arange(10) % 5
    table, per_fold = nested_estimate(runs, truth, 4, groups)
    assert table.rows.shape == (10, 3) and len(per_fold) == 5
    for g, w in enumerate(per_fold):
        sel = groups == g
        assert np.allclose(table.rows[2 * g:2 * g + 2], blend_table([p[sel] for p in runs], w, truth[sel], 4).rows)
        assert np.allclose(w, fit_weights([p[~sel] for p in runs], truth[~sel], 4)[0])


def test_ensemble_weights_auto_prints_saves_and_applies(project, tmp_path, main_cli):
    twin = copy_run(project.run, tmp_path / "twin", slim=True)
    out = tmp_path / "sub.csv"
    proc = main_cli("ensemble", "--runs", project.run, "--runs", twin, "--data", project.data, "--weights", "auto",
                    "--out", out, "--device", "cpu", "--postprocess", "none")
    assert proc.returncode == 0, proc.stderr
    for needle in ("OOF tiny:", "OOF twin:", "equal-weight blend", "fitted blend", "optimistic", "nested"):
        assert needle in proc.stdout, needle
    rec = json.loads((tmp_path / "sub.weights.json").read_text())
    assert rec["weights"] == {"tiny": 0.5, "twin": 0.5}  # identical runs: the tie goes to equal weights
    assert rec["oof"]["tiny"] == pytest.approx(rec["oof"]["twin"]) == pytest.approx(rec["oof_equal"])
    assert rec["submission"] == str(out) and out.is_file()


def test_ensemble_weights_must_be_numbers_or_auto(project, tmp_path, main_cli, assert_cli_error):
    proc = main_cli("ensemble", "--runs", project.run, "--data", project.data, "--weights", "heavy",
                    "--out", tmp_path / "s.csv")
    assert_cli_error(proc, "--weights")


def test_ensemble_select_loads_the_named_checkpoint_of_every_fold(project):
    """``--select last`` swaps every fold's model for its ``last.safetensors`` (an honest OOF for runs kept
    at the best epoch); the default is each fold's ``train.select``."""
    import torch

    from kagglecmr.engine.ensembler import load_run
    from kagglecmr.models.checkpoint import load_best

    dev = torch.device("cpu")
    for select, name in ((None, "best"), ("best", "best"), ("last", "last")):
        run = load_run(project.run, dev, select=select)
        for k, model in run.models.items():
            want, _ = load_best(project.run / f"fold{k}" / f"{name}.safetensors")
            got = model.state_dict()
            assert all(torch.equal(got[n].cpu(), t) for n, t in want.items()), (select, k)


def test_ensemble_select_last_scores_oof_without_touching_the_run(project, tmp_path, main_cli, assert_cli_error):
    from conftest import tree_snapshot

    run = copy_run(project.run, tmp_path / "tiny", slim=True)
    before = tree_snapshot(run)
    proc = main_cli("ensemble", "--runs", run, "--data", project.data, "--split", "oof", "--select", "last",
                    "--out", tmp_path / "oof_last.csv", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "OOF Dice" in proc.stdout and (tmp_path / "oof_last.csv").is_file()
    assert tree_snapshot(run) == before  # no postprocess.json / ensemble_oof.json of other checkpoints
    proc = main_cli("ensemble", "--runs", run, "--data", project.data, "--split", "oof", "--select", "swa",
                    "--out", tmp_path / "swa.csv", "--device", "cpu")
    assert_cli_error(proc, "swa.safetensors", "train.swa_epochs")
    proc = main_cli("ensemble", "--runs", run, "--data", project.data, "--select", "final",
                    "--out", tmp_path / "x.csv", "--device", "cpu")
    assert_cli_error(proc, "--select final")
    assert not (tmp_path / "swa.csv").exists() and not (tmp_path / "x.csv").exists()
