"""``kagglecmr train``: run artefacts, determinism, crash resume, skip/force, fold specs, bad input.

Most checks reuse the session's tiny 5-fold run (``conftest.project``); the rest train single tiny
folds of 1-2 epochs (a fraction of a second each on a CPU).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import N_FOLDS, N_TRAIN, N_VAL, RUN_NAME, copy_run, tree_snapshot, truth_masks

from kagglecmr.cfg.config import load_config
from kagglecmr.engine.orchestrate import parse_fold_spec, run_train
from kagglecmr.engine.trainer import TIME_COLUMNS
from kagglecmr.formats.metric import dice_table
from kagglecmr.utils.errors import KaggleCMRError

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_dice", "val_score", "dice_1", "dice_2", "dice_3", "best",
                  *TIME_COLUMNS]


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in rows]


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_tensors(a), load_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def train_lib(project, runs_dir: Path, fold: str = "0", overrides: list[str] | None = None, name=None):
    cfg = load_config(project.config, overrides)
    return run_train(cfg, fold_spec=fold, data_root=project.data, folds_path=project.folds, name=name,
                     runs_dir=runs_dir, device="cpu", force=False, quiet=True)


def train_args(project, runs_dir: Path, fold: str = "0", *extra) -> list[str]:
    return ["train", "--fold", fold, "--config", project.config, "--data", project.data, "--folds", project.folds,
            "--runs-dir", runs_dir, "--quiet", *extra]


def fold_ids(project, k: int) -> list[str]:
    df = pd.read_csv(project.folds, dtype={"id": str})
    return df.loc[df["fold"] == k, "id"].tolist()


# ------------------------------------------------------------------------------------ artefacts
@pytest.mark.parametrize("k", range(N_FOLDS))
def test_fold_artefacts(project, tiny_cfg, k):
    d = project.run / f"fold{k}"
    expected = {"config.yaml", "env.json", "metrics.csv", "last.pt", "best.safetensors", "oof.npz", "curves.png",
                "summary.json"}
    assert expected <= {p.name for p in d.iterdir()}

    assert yaml.safe_load((d / "config.yaml").read_text()) == tiny_cfg.to_dict()

    env = json.loads((d / "env.json").read_text())
    for pkg in ("torch", "segmentation-models-pytorch", "timm"):
        assert env["packages"][pkg] not in ("", "not installed"), pkg
    assert env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert "git_commit" in env and env["git_commit"]
    assert env["device"] == "cpu"
    assert isinstance(env["parameters"], int) and env["parameters"] > 0
    assert env["seconds_per_epoch"] > 0 and env["peak_memory_mb"] > 0

    rows = read_metrics(d / "metrics.csv")
    assert list(rows[0].keys()) == METRIC_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        for col in ("lr", "train_loss", "val_loss", "val_dice", "dice_1", "dice_2", "dice_3", *TIME_COLUMNS):
            assert math.isfinite(float(r[col])), col
        assert 0 <= float(r["val_dice"]) <= 1
        assert r["val_score"] == r["val_dice"]  # the default metric is Dice
    assert rows[0]["best"] == "True"  # the first epoch always improves on nothing

    state = torch.load(d / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2

    summary = json.loads((d / "summary.json").read_text())
    assert summary["fold"] == k and summary["epochs"] == 2
    best_rows = [r for r in rows if r["best"] == "True"]
    assert summary["best_epoch"] == int(best_rows[-1]["epoch"])
    assert summary["best_score"] == pytest.approx(float(best_rows[-1]["val_dice"]), abs=1e-6)

    tensors = load_tensors(d / "best.safetensors")
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values())

    with np.load(d / "oof.npz") as z:
        ids, probs, labels, dice = [str(i) for i in z["ids"]], z["probs"], z["labels"], z["dice"]
    assert ids == fold_ids(project, k)
    assert probs.dtype == np.float16 and probs.shape == (len(ids), 4, 96, 96)
    np.testing.assert_allclose(probs.astype(np.float32).sum(1), 1.0, atol=5e-3)
    assert labels.dtype == np.uint8 and labels.shape == (len(ids), 96, 96)
    # labels: the float32 argmax, which float16 rounding may only change at near-ties
    changed = labels != probs.astype(np.float32).argmax(1)
    top2 = np.sort(probs.astype(np.float32), axis=1)[:, -2:]
    assert ((top2[:, 1] - top2[:, 0])[changed] <= 2e-3).all() and changed.mean() < 0.01
    assert dice.shape == (len(ids), 3)
    np.testing.assert_allclose(dice, dice_table(labels, truth_masks(project, ids), 4), atol=1e-12)
    # OOF predictions come from the best checkpoint: their Dice is the best epoch's validation Dice
    assert dice.mean() == pytest.approx(summary["best_score"], abs=1e-9)

    png = (d / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100



def test_oof_json_matches_independent_recomputation(project):
    oof = json.loads((project.run / "oof.json").read_text())
    preds, ids = [], []
    for k in range(N_FOLDS):
        with np.load(project.run / f"fold{k}" / "oof.npz") as z:
            ids += [str(i) for i in z["ids"]]
            preds.append(z["labels"])
    assert sorted(ids) == sorted(pd.read_csv(project.folds, dtype={"id": str})["id"])  # every image exactly once
    table = dice_table(np.concatenate(preds), truth_masks(project, ids), 4)
    assert oof["score"] == pytest.approx(table.mean(), abs=1e-12)
    assert oof["rows"] == table.size == 3 * len(ids) and oof["images"] == len(ids)
    for c in (1, 2, 3):
        assert oof["per_class"][str(c)] == pytest.approx(table[:, c - 1].mean(), abs=1e-12)


# ------------------------------------------------------------------------------------ determinism
def test_same_seed_same_fold_is_bit_identical(project, tmp_path):
    train_lib(project, tmp_path / "again", fold="1")
    a, b = project.run / "fold1", tmp_path / "again" / RUN_NAME / "fold1"
    assert without_time(read_metrics(a / "metrics.csv")) == without_time(read_metrics(b / "metrics.csv"))
    assert_same_tensors(a / "best.safetensors", b / "best.safetensors")

    # ... and the comparison can fail: another seed gives other numbers
    train_lib(project, tmp_path / "seed8", fold="1", overrides=["seed=8"])
    c = tmp_path / "seed8" / RUN_NAME / "fold1"
    assert without_time(read_metrics(a / "metrics.csv")) != without_time(read_metrics(c / "metrics.csv"))


# ------------------------------------------------------------------------------------ resume
def _metric_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def test_resume_after_kill_replays_an_uninterrupted_run(project, tmp_path, cli):
    epochs = 6
    for attempt in range(4):
        runs = tmp_path / f"crash{attempt}"
        fold_dir = runs / RUN_NAME / "fold0"
        cmd = [sys.executable, "-m", "kagglecmr", *map(str, train_args(project, runs, "0", "--epochs", epochs))]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 240
        while proc.poll() is None and _metric_rows(fold_dir / "metrics.csv") < 2 and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        if proc.returncode == -signal.SIGKILL and not (fold_dir / "summary.json").exists():
            break
        epochs *= 2  # finished before we could kill it: make the fold longer
    else:
        pytest.fail("the fold always finished before it could be killed")
    done = _metric_rows(fold_dir / "metrics.csv")
    assert 2 <= done < epochs

    again = cli(*train_args(project, runs, "0", "--epochs", epochs))
    assert again.returncode == 0, again.stderr
    assert "resuming after epoch" in again.stdout
    resumed_at = int(again.stdout.split("resuming after epoch")[1].split()[0])
    assert 2 <= resumed_at <= done + 1  # kill may land between last.pt and metrics.csv
    assert (fold_dir / "summary.json").is_file()

    train_lib(project, tmp_path / "straight", fold="0", overrides=[f"train.epochs={epochs}"])
    ref = tmp_path / "straight" / RUN_NAME / "fold0"
    resumed_rows = read_metrics(fold_dir / "metrics.csv")
    assert len(resumed_rows) == epochs
    assert without_time(resumed_rows) == without_time(read_metrics(ref / "metrics.csv"))
    assert_same_tensors(fold_dir / "best.safetensors", ref / "best.safetensors")


# ------------------------------------------------------------------------------------ skip / force / config
def test_finished_fold_is_skipped_unless_force(project, tmp_path, cli, main_cli):
    runs = tmp_path / "runs"
    copy_run(project.run, runs / RUN_NAME)
    folds_before = {k: v for k, v in tree_snapshot(runs).items() if k.startswith(f"{RUN_NAME}/fold")}

    proc = cli(*train_args(project, runs, "0..4"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("already finished") == N_FOLDS
    assert "resuming" not in proc.stdout
    folds_after = {k: v for k, v in tree_snapshot(runs).items() if k.startswith(f"{RUN_NAME}/fold")}
    assert folds_after == folds_before  # same bytes, same mtimes

    proc = main_cli(*train_args(project, runs, "0", "--force"))
    assert proc.returncode == 0, proc.stderr
    assert "already finished" not in proc.stdout and "resuming" not in proc.stdout
    after = tree_snapshot(runs)
    f0 = f"{RUN_NAME}/fold0/"
    assert after[f0 + "metrics.csv"][1] != folds_before[f0 + "metrics.csv"][1]  # retrained: new files
    assert after[f0 + "summary.json"][1] != folds_before[f0 + "summary.json"][1]
    for key, value in folds_before.items():  # other folds untouched
        if not key.startswith(f0):
            assert after[key] == value, key
    assert without_time(read_metrics(runs / f0 / "metrics.csv")) == \
        without_time(read_metrics(project.run / "fold0" / "metrics.csv"))


def test_rerun_with_another_config_is_refused(project, tmp_path, main_cli, assert_cli_error):
    runs = tmp_path / "runs"
    copy_run(project.run, runs / RUN_NAME, slim=True)
    before = tree_snapshot(runs)
    proc = main_cli(*train_args(project, runs, "0", "--set", "train.lr=0.01"))
    assert_cli_error(proc, "fold0", "another config", "train.lr")
    assert tree_snapshot(runs) == before


# ------------------------------------------------------------------------------------ --fold
@pytest.mark.parametrize(("spec", "n", "expected"), [
    ("0", 5, [0]), ("4", 5, [4]), ("0..2", 5, [0, 1, 2]), ("0,2", 5, [0, 2]), (" 2, 0,2 ", 5, [0, 2]),
    ("all", 5, ["all"]), ("ALL", 3, ["all"]), ("0..4", 5, [0, 1, 2, 3, 4]),
])
def test_parse_fold_spec(spec, n, expected):
    assert parse_fold_spec(spec, n) == expected


@pytest.mark.parametrize("spec", ["5", "a", "3..1", "-1", "0..5", "1..x", "", ","])
def test_parse_fold_spec_rejects(spec):
    with pytest.raises(KaggleCMRError, match="--fold"):
        parse_fold_spec(spec, 5)


@pytest.mark.parametrize(("spec", "needle"), [("5", "out of range"), ("a", "expected"), ("3..1", "no folds")])
def test_cli_bad_fold_spec(project, tmp_path, main_cli, assert_cli_error, spec, needle):
    runs = tmp_path / "runs"
    proc = main_cli(*train_args(project, runs, spec))
    assert_cli_error(proc, f"--fold {spec}", needle)
    assert not runs.exists()


def test_fold_all_trains_full_fit_with_median_best_epoch(project, tmp_path, main_cli):
    runs = tmp_path / "runs"
    run = copy_run(project.run, runs / RUN_NAME, slim=True)
    for k, best in enumerate([1, 1, 2, 1, 2]):  # median 1, fewer than the config's 2 epochs
        p = run / f"fold{k}" / "summary.json"
        p.write_text(json.dumps(json.loads(p.read_text()) | {"best_epoch": best}))
    proc = main_cli(*train_args(project, runs, "all"))
    assert proc.returncode == 0, proc.stderr
    full = run / "full"
    assert yaml.safe_load((full / "config.yaml").read_text())["train"]["epochs"] == 1
    rows = read_metrics(full / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1]
    assert math.isfinite(float(rows[0]["train_loss"]))
    summary = json.loads((full / "summary.json").read_text())
    assert summary["fold"] == "all" and summary["epochs"] == 1 and summary["val_images"] == 0
    assert summary["train_images"] == 25
    assert (full / "best.safetensors").is_file() and not (full / "oof.npz").exists()

    again = main_cli(*train_args(project, runs, "all"))  # a finished full fit is skipped like any fold
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stdout

    # the test-set ensemble adds the full fit as one more model; --no-full and the OOF split leave it out
    from kagglecmr.engine.ensembler import load_run

    cpu = torch.device("cpu")
    assert len(load_run(run, cpu, with_full=True).models) == N_FOLDS + 1
    assert len(load_run(run, cpu, with_full=False).models) == N_FOLDS
    with_full = main_cli("ensemble", "--runs", run, "--data", project.data, "--postprocess", "none",
                         "--out", tmp_path / "with_full.csv", "--device", "cpu")
    assert with_full.returncode == 0, with_full.stderr
    assert f"ensemble of {N_FOLDS + 1} models" in with_full.stdout
    without = main_cli("ensemble", "--runs", run, "--data", project.data, "--postprocess", "none", "--no-full",
                       "--out", tmp_path / "without.csv", "--device", "cpu")
    assert f"ensemble of {N_FOLDS} models" in without.stdout


def test_jobs_trains_folds_in_parallel_processes(project, tmp_path, cli):
    runs = tmp_path / "runs"
    proc = cli(*train_args(project, runs, "0..4"), "--jobs", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "2 at a time" in proc.stdout
    for k in range(N_FOLDS):
        assert (runs / RUN_NAME / f"fold{k}" / "summary.json").is_file()
    oof = json.loads((runs / RUN_NAME / "oof.json").read_text())
    assert oof["images"] == N_TRAIN + N_VAL and 0 <= oof["score"] <= 1
    assert "out-of-fold Dice" in proc.stdout


def test_fold_all_without_cv_folds_is_an_error(project, tmp_path, main_cli, assert_cli_error):
    runs = tmp_path / "runs"
    assert_cli_error(main_cli(*train_args(project, runs, "all")), "--fold all", "train --fold 0..4 first")
    assert not runs.exists()


# ------------------------------------------------------------------------------------ bad input
@pytest.fixture
def existing_runs(project, tmp_path):
    runs = tmp_path / "runs"
    copy_run(project.run, runs / RUN_NAME, slim=True)
    return runs


def test_folds_file_with_extra_id(project, tmp_path, existing_runs, main_cli, assert_cli_error):
    df = pd.read_csv(project.folds, dtype={"id": str})
    extra = df.iloc[[0]].assign(id="cmr999", group=df["group"].max() + 1)
    bad = tmp_path / "extra.csv"
    pd.concat([df, extra]).to_csv(bad, index=False)
    before = tree_snapshot(existing_runs)
    proc = main_cli("train", "--fold", "0", "--config", project.config, "--data", project.data, "--folds", bad,
               "--runs-dir", existing_runs, "--quiet")
    assert_cli_error(proc, str(bad), "cmr999", "not in the data")
    assert tree_snapshot(existing_runs) == before


def test_folds_file_with_missing_id(project, tmp_path, existing_runs, main_cli, assert_cli_error):
    df = pd.read_csv(project.folds, dtype={"id": str})
    bad = tmp_path / "missing.csv"
    df[df["id"] != "cmr3"].to_csv(bad, index=False)
    before = tree_snapshot(existing_runs)
    proc = main_cli("train", "--fold", "0", "--config", project.config, "--data", project.data, "--folds", bad,
               "--runs-dir", existing_runs, "--quiet")
    assert_cli_error(proc, str(bad), "missing", "cmr3")
    assert tree_snapshot(existing_runs) == before


def test_missing_data_dir(project, tmp_path, existing_runs, main_cli, assert_cli_error):
    before = tree_snapshot(existing_runs)
    proc = main_cli("train", "--fold", "0", "--config", project.config, "--data", tmp_path / "nope", "--folds",
               project.folds, "--runs-dir", existing_runs, "--quiet")
    assert_cli_error(proc, "nope", "not found")
    assert tree_snapshot(existing_runs) == before


@pytest.mark.parametrize(("edit", "key"), [
    (lambda t: t.replace("  lr: 0.003", "  lr: 0.003\n  epochz: 3"), "train.epochz"),
    (lambda t: t + "extra_section: {a: 1}\n", "extra_section"),
    (lambda t: t.replace("gamma: 0.3}", "gamma: 0.3, wobble: 1}"), "augment.wobble"),
])
def test_config_with_unknown_key(project, tmp_path, existing_runs, main_cli, assert_cli_error, edit, key):
    cfg = tmp_path / "tiny.yaml"  # same name as the run, so only the key can be at fault
    cfg.write_text(edit(project.config.read_text()))
    before = tree_snapshot(existing_runs)
    proc = main_cli("train", "--fold", "0", "--config", cfg, "--data", project.data, "--folds", project.folds,
               "--runs-dir", existing_runs, "--quiet")
    line = assert_cli_error(proc, key, "unknown key")
    assert str(cfg) in line
    assert tree_snapshot(existing_runs) == before


# ------------------------------------------------------------------------------------ precision / backends
def _one_epoch(project, runs: Path, override: str) -> tuple[dict, dict]:
    train_lib(project, runs, fold="2", overrides=[override, "train.epochs=1"])
    d = runs / RUN_NAME / "fold2"
    rows = read_metrics(d / "metrics.csv")
    assert len(rows) == 1
    for col in ("train_loss", "val_loss", "val_dice"):
        assert math.isfinite(float(rows[0][col])), col
    with np.load(d / "oof.npz") as z:
        assert np.isfinite(z["probs"].astype(np.float32)).all()
    return rows[0], json.loads((d / "env.json").read_text())


def test_bf16_autocast_on_cpu(project, tmp_path):
    _, env = _one_epoch(project, tmp_path / "runs", "train.amp=bf16")
    assert env["amp"] == "bfloat16"


def test_torch_augment_backend_on_cpu(project, tmp_path):
    _, env = _one_epoch(project, tmp_path / "runs", "augment.backend=torch")
    assert env["augment_backend"] == "torch"
