"""Honest OOF: ``train.select: best | last | swa`` and ``train.swa_epochs``; the last-epoch OOF beside the
best-epoch one; ``train --seeds``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import N_FOLDS

from kagglecmr.cfg.config import load_config
from kagglecmr.data.dataset import prepare
from kagglecmr.engine.ensembler import load_run
from kagglecmr.engine.infer import predict_proba
from kagglecmr.engine.orchestrate import run_train, seed_runs
from kagglecmr.engine.rundir import read_oof_labels
from kagglecmr.formats.metric import dice_table
from kagglecmr.models.checkpoint import model_file
from kagglecmr.utils.errors import ConfigError


def test_project_run_reports_the_last_epoch_oof_beside_the_best(project, labelled):
    oof = json.loads((project.run / "oof.json").read_text())
    assert oof["select"] == "best" and "score_swa" not in oof
    for name, key in (("oof.npz", "score"), ("oof_last.npz", "score_last")):
        ids, preds = read_oof_labels([project.run / f"fold{k}" / name for k in range(N_FOLDS)])
        table = dice_table(np.concatenate(preds), labelled.subset(ids).masks, 4)
        assert oof[key] == pytest.approx(table.mean())
    assert set(oof["per_class_last"]) == {"1", "2", "3"}
    for k in range(N_FOLDS):
        d = project.run / f"fold{k}"
        summary = json.loads((d / "summary.json").read_text())
        with np.load(d / "oof_last.npz") as z:
            assert z["dice"].mean() == pytest.approx(summary["last_score"], abs=1e-9)
        assert model_file(d) == d / "best.safetensors"


def test_select_and_swa_are_validated():
    with pytest.raises(ConfigError, match="swa_epochs"):
        load_config(None, ["train.select=swa"])
    with pytest.raises(ConfigError, match="swa_epochs"):
        load_config(None, ["train.epochs=3", "train.swa_epochs=4"])
    with pytest.raises(ConfigError, match="train.select"):
        load_config(None, ["train.select=median"])
    assert load_config(None).train.select == "best"  # the default recipe does not change


def test_swa_fold_keeps_the_average_with_recomputed_batchnorm(project, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    cfg = load_config(project.config, ["train.epochs=3", "train.swa_epochs=2", "train.select=swa"])
    run_train(cfg, fold_spec="0", data_root=project.data, folds_path=project.folds, name="swa",
              runs_dir=tmp_path, device="cpu", force=False, quiet=True)
    d = tmp_path / "swa" / "fold0"
    assert model_file(d) == d / "swa.safetensors"
    assert {"oof.npz", "oof_last.npz", "oof_swa.npz", "last.safetensors", "swa.safetensors"} <= \
        {p.name for p in d.iterdir()}
    swa, last = load_file(d / "swa.safetensors"), load_file(d / "last.safetensors")
    stats = [k for k in swa if k.endswith("running_mean")]
    assert stats and any(not np.allclose(swa[k], last[k]) for k in stats)
    weights = [k for k in swa if k.endswith(".weight") and swa[k].ndim == 4]
    assert any(not np.allclose(swa[k], last[k]) for k in weights)  # an average of two epochs, not the last
    # the SWA model is what the ensemble loads: its predictions are oof_swa.npz's
    run = load_run(tmp_path / "swa", torch.device("cpu"))
    assert list(run.models) == [0]
    with np.load(d / "oof_swa.npz") as z:
        ids, probs = [str(i) for i in z["ids"]], z["probs"].astype(np.float32)
    images = prepare(cfg, project.data, quiet=True)[2].subset(ids).images
    again = predict_proba(run.models[0], images, torch.device("cpu"), batch_size=16)
    np.testing.assert_allclose(again, probs, atol=2e-3)


def test_select_last_full_fit_uses_the_configured_epochs(project, tmp_path):
    from kagglecmr.engine.rundir import full_fit_epochs

    assert full_fit_epochs(project.run, load_config(project.config, ["train.select=last"])) == 2


def test_seed_runs_names_and_seeds():
    cfg = load_config(None)
    out = seed_runs(cfg, "42,43", "base")
    assert [(c.seed, n) for c, n in out] == [(42, "base-s42"), (43, "base-s43")]
    assert cfg.seed == 42 and out[1][0].model == cfg.model
    with pytest.raises(Exception, match="--seeds"):
        seed_runs(cfg, "4,x", None)
    with pytest.raises(Exception, match="--seeds"):
        seed_runs(cfg, "4,4", None)


def test_train_seeds_trains_one_run_per_seed(project, tmp_path, main_cli, one_torch_thread):
    proc = main_cli("train", "--fold", "0", "--config", project.config, "--data", project.data, "--folds",
                    project.folds, "--runs-dir", tmp_path, "--epochs", "1", "--seeds", "3,4", "--quiet")
    assert proc.returncode == 0, proc.stderr
    for s in (3, 4):
        saved = yaml.safe_load((tmp_path / f"tiny-s{s}" / "fold0" / "config.yaml").read_text())
        assert saved["seed"] == s
    a = (tmp_path / "tiny-s3" / "fold0" / "metrics.csv").read_text().splitlines()[1]
    b = (tmp_path / "tiny-s4" / "fold0" / "metrics.csv").read_text().splitlines()[1]
    assert a.split(",")[:4] != b.split(",")[:4]  # different seeds, different training


def test_full_fit_with_swa_shorter_than_the_cv_epochs(project, tmp_path, one_torch_thread):
    """--fold all trains for the median best epoch; SWA then averages at most that many epochs."""
    from conftest import copy_run

    from kagglecmr.engine.rundir import full_fit_epochs

    run = copy_run(project.run, tmp_path / "tiny", slim=True)
    for k in range(N_FOLDS):  # pretend every fold peaked at epoch 1
        p = run / f"fold{k}" / "summary.json"
        p.write_text(json.dumps(json.loads(p.read_text()) | {"best_epoch": 1}))
    cfg = load_config(project.config, ["train.swa_epochs=2"])
    assert full_fit_epochs(run, cfg) == 1
    run_train(cfg, fold_spec="all", data_root=project.data, folds_path=project.folds, name="tiny",
              runs_dir=tmp_path, device="cpu", force=False, quiet=True)
    saved = yaml.safe_load((run / "full" / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["train"]["swa_epochs"] == 1
    assert (run / "full" / "swa.safetensors").is_file() and model_file(run / "full") == run / "full" / "best.safetensors"
