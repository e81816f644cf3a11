"""Pseudo-labels: ``kagglecmr pseudo-label`` writes one honest mask set per fold (the fold-k teachers
only) plus one from the whole ensemble; ``train --pseudo`` trains fold k on DIR/fold<k> only; runs on
different folds files never mix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import N_FOLDS, N_TEST, copy_run, tree_snapshot

from kagglecmr.cfg.config import load_config
from kagglecmr.data.dataset import load_dataset
from kagglecmr.data.folds import run_make_folds
from kagglecmr.engine import pseudo as pl
from kagglecmr.engine.orchestrate import run_train
from kagglecmr.engine.rundir import sha256_file
from kagglecmr.models import checkpoint as ckpt


def fold_ids(folds: Path, k: int) -> list[str]:
    df = pd.read_csv(folds, dtype={"id": str})
    return sorted(df.loc[df["fold"] == k, "id"].tolist())


def teacher_prediction(run: Path, names: list[str], images: np.ndarray, file: str = "best.safetensors") -> np.ndarray:
    """Mean softmax of the named fold models, computed here without kagglecmr.engine.pseudo."""
    import torch

    from kagglecmr.cfg.config import Config
    from kagglecmr.engine.infer import predict_proba
    from kagglecmr.models.factory import build_model

    total = 0
    for name in names:
        sd, meta = ckpt.load_best(run / name / file)
        model = build_model(Config.model_validate(meta["config"]), weights="none", check_size=False)
        model.load_state_dict(sd)
        total = total + predict_proba(model, images, torch.device("cpu"), batch_size=8)
    return total / len(names)


@pytest.fixture(scope="module")
def labels_dir(project, tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("pseudo") / "pl"
    pl.pseudo_label(runs=[project.run], data_root=project.data, out=out, confidence=0.6, device="cpu")
    return out


def test_layout_and_manifest(project, labels_dir):
    manifest = json.loads((labels_dir / "manifest.json").read_text())
    assert manifest["folds_sha256"] == sha256_file(project.folds)
    assert manifest["confidence"] == 0.6 and manifest["tta"] == ["none"] and manifest["n_folds"] == N_FOLDS
    assert manifest["teachers"][0]["name"] == project.run.name
    assert set(manifest["per_fold"]) == {f"fold{k}" for k in range(N_FOLDS)} | {"full"}
    test_ids = load_dataset(project.data).load("test", labelled=False).ids
    for name, rec in manifest["per_fold"].items():
        assert set(rec["per_image"]) == set(test_ids)
        for t in rec["teachers"]:
            assert t["sha256"] == sha256_file(Path(t["checkpoint"]))
        kept = [i for i, s in rec["per_image"].items() if s["kept"]]
        assert sorted(p.stem for p in (labels_dir / name / "train" / "image").iterdir()) == sorted(kept)
        for i in kept:  # the image is the test image, byte for byte
            assert (labels_dir / name / "train" / "image" / f"{i}.png").read_bytes() == \
                (project.data / "test" / "image" / f"{i}.png").read_bytes()
            m = cv2.imread(str(labels_dir / name / "train" / "mask" / f"{i}_mask.png"), cv2.IMREAD_UNCHANGED)
            assert set(np.unique(m)) <= {0, 1, 2, 3, 255}
            assert (m == 255).mean() == pytest.approx(rec["per_image"][i]["ignored_fraction"], abs=1e-5)
    assert len(manifest["per_fold"]["full"]["teachers"]) == N_FOLDS


@pytest.mark.parametrize("k", range(N_FOLDS))
def test_fold_masks_come_from_the_fold_k_teacher_only(project, labels_dir, k):
    """Honest OOF: DIR/fold<k> masks are exactly the fold-k model's prediction, and that model held out
    exactly fold k's validation ids."""
    rec = json.loads((labels_dir / "manifest.json").read_text())["per_fold"][f"fold{k}"]
    assert [Path(t["checkpoint"]) for t in rec["teachers"]] == [project.run / f"fold{k}" / "best.safetensors"]
    assert [t["holdout"] for t in rec["teachers"]] == [fold_ids(project.folds, k)]
    test = load_dataset(project.data).load("test", labelled=False)
    probs = teacher_prediction(project.run, [f"fold{k}"], test.images)
    expect = probs.argmax(1).astype(np.uint8)
    expect[probs.max(1) < 0.6] = 255
    for i, e in zip(test.ids, expect):
        p = labels_dir / f"fold{k}" / "train" / "mask" / f"{i}_mask.png"
        if p.is_file():
            assert np.array_equal(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), e)
        else:
            assert (e == 255).all()


def test_full_masks_come_from_every_fold_model(project, labels_dir):
    test = load_dataset(project.data).load("test", labelled=False)
    probs = teacher_prediction(project.run, [f"fold{k}" for k in range(N_FOLDS)], test.images)
    expect = probs.argmax(1).astype(np.uint8)
    expect[probs.max(1) < 0.6] = 255
    for i, e in zip(test.ids, expect):
        p = labels_dir / "full" / "train" / "mask" / f"{i}_mask.png"
        if p.is_file():
            got = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            assert (got != e).mean() < 1e-3  # float summation order may flip exact ties only


def test_teacher_probs_reads_no_other_folds_model(project, monkeypatch, one_torch_thread):
    read = []
    real = ckpt.load_best
    monkeypatch.setattr(pl, "load_best", lambda p: read.append(Path(p)) or real(p))  # the name pseudo calls
    images = load_dataset(project.data).load("test", labelled=False).images
    for k in range(N_FOLDS):
        read.clear()
        pl.teacher_probs([project.run], k, images, "cpu", ["none"], 8)
        assert read == [project.run / f"fold{k}" / "best.safetensors"]


def test_refuses_to_overwrite_without_force(project, labels_dir, main_cli, assert_cli_error):
    before = tree_snapshot(labels_dir)
    proc = main_cli("pseudo-label", "--runs", project.run, "--data", project.data, "--out", labels_dir,
                    "--device", "cpu")
    assert_cli_error(proc, str(labels_dir), "--force")
    assert tree_snapshot(labels_dir) == before


def test_force_replaces_and_confidence_zero_ignores_nothing(project, tmp_path, main_cli, one_torch_thread):
    out = tmp_path / "pl"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    proc = main_cli("pseudo-label", "--runs", project.run, "--data", project.data, "--out", out, "--confidence",
                    "0", "--device", "cpu", "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "stale.txt").exists()
    masks = list((out / "fold0" / "train" / "mask").iterdir())
    assert len(masks) == N_TEST
    assert all((cv2.imread(str(p), cv2.IMREAD_UNCHANGED) != 255).all() for p in masks)


def test_teachers_on_different_folds_files_are_refused(project, tmp_path, main_cli, assert_cli_error):
    other = copy_run(project.run, tmp_path / "other", slim=True)
    info = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps(info | {"folds_sha256": "0" * 64}))
    proc = main_cli("pseudo-label", "--runs", project.run, "--runs", other, "--data", project.data,
                    "--out", tmp_path / "pl", "--device", "cpu")
    assert_cli_error(proc, "another folds file")
    assert not (tmp_path / "pl").exists()


def test_select_last_labels_with_every_teachers_last_checkpoint(project, tmp_path, main_cli, one_torch_thread):
    out = tmp_path / "pl_last"
    proc = main_cli("pseudo-label", "--runs", project.run, "--data", project.data, "--out", out, "--confidence",
                    "0.6", "--device", "cpu", "--select", "last")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["select"] == "last"
    k = 2
    rec = manifest["per_fold"][f"fold{k}"]
    assert [Path(t["checkpoint"]) for t in rec["teachers"]] == [project.run / f"fold{k}" / "last.safetensors"]
    test = load_dataset(project.data).load("test", labelled=False)
    probs = teacher_prediction(project.run, [f"fold{k}"], test.images, "last.safetensors")
    expect = probs.argmax(1).astype(np.uint8)
    expect[probs.max(1) < 0.6] = 255
    for i, e in zip(test.ids, expect):
        p = out / f"fold{k}" / "train" / "mask" / f"{i}_mask.png"
        assert np.array_equal(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), e) if p.is_file() else (e == 255).all()


@pytest.mark.parametrize(("select", "words"), [("swa", "swa.safetensors"), ("final", "--select final")])
def test_select_missing_or_unknown_checkpoint_is_refused(project, tmp_path, main_cli, assert_cli_error,
                                                        select, words):
    proc = main_cli("pseudo-label", "--runs", project.run, "--data", project.data, "--out", tmp_path / "pl",
                    "--device", "cpu", "--select", select)
    assert_cli_error(proc, words)
    assert not (tmp_path / "pl").exists() and not list(tmp_path.glob(".pl.*"))


# ------------------------------------------------------------------------------------ train --pseudo
def _student(project, runs_dir, labels_dir, fold="1", *, name="student", weight=1.0, ratio=0.5, folds=None):
    cfg = load_config(project.config, ["train.epochs=1", f"train.pseudo.dir={labels_dir}",
                                       f"train.pseudo.weight={weight}", f"train.pseudo.ratio={ratio}"])
    return run_train(cfg, fold_spec=fold, data_root=project.data, folds_path=folds or project.folds, name=name,
                     runs_dir=runs_dir, device="cpu", force=False, quiet=True)


def test_fold_k_student_reads_only_the_fold_k_pseudo_labels(project, labels_dir, tmp_path, monkeypatch,
                                                            one_torch_thread):
    read = []
    real = pl.load_pseudo
    monkeypatch.setattr(pl, "load_pseudo", lambda d, fold, spec: read.append((Path(d), fold)) or real(d, fold, spec))
    _student(project, tmp_path, labels_dir, "1")
    assert read == [(labels_dir, 1)]
    d = tmp_path / "student" / "fold1"
    env = json.loads((d / "env.json").read_text())
    manifest_sha = sha256_file(labels_dir / "manifest.json")
    assert env["pseudo_source"] == str(labels_dir / "fold1")
    assert env["pseudo_manifest_sha256"] == manifest_sha
    assert env["folds_sha256"] == sha256_file(project.folds)
    assert env["pseudo_images"] == len(list((labels_dir / "fold1" / "train" / "image").iterdir()))
    assert env["val_images"] == len(fold_ids(project.folds, 1))  # pseudo images never validate
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["train"]["pseudo"] == {"dir": str(labels_dir), "weight": 1.0, "ratio": 0.5}
    info = json.loads((tmp_path / "student" / "run.json").read_text())
    assert info["pseudo"]["manifest_sha256"] == manifest_sha


def test_pseudo_training_is_deterministic_and_the_weight_matters(project, labels_dir, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    for name, w in (("a", 1.0), ("b", 1.0), ("c", 0.0)):
        _student(project, tmp_path, labels_dir, "2", name=name, weight=w)
    a, b, c = (load_file(tmp_path / n / "fold2" / "last.safetensors") for n in "abc")
    assert all((a[k] == b[k]).all() for k in a)
    assert any(not (a[k] == c[k]).all() for k in a if a[k].is_floating_point())


def test_student_on_another_folds_file_is_refused(project, labels_dir, tmp_path, main_cli, assert_cli_error):
    other = tmp_path / "folds_other.csv"
    run_make_folds(project.data, n_folds=N_FOLDS, seed=7, out=other)
    proc = main_cli("train", "--fold", "0", "--config", project.config, "--data", project.data, "--folds", other,
                    "--runs-dir", tmp_path / "runs", "--pseudo", labels_dir, "--quiet")
    assert_cli_error(proc, "manifest.json", "folds file")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))


def test_a_student_is_a_teacher_for_the_next_round(project, labels_dir, tmp_path, one_torch_thread):
    runs_dir = tmp_path / "runs"
    _student(project, runs_dir, labels_dir, "0..4", ratio=0.25)
    student = runs_dir / "student"
    assert json.loads((student / "oof.json").read_text())["score_last"] >= 0
    round2 = pl.pseudo_label(runs=[student, project.run], data_root=project.data, out=tmp_path / "round2",
                             confidence=0.5, device="cpu")
    assert round2["folds_sha256"] == sha256_file(project.folds)
    assert [Path(t["checkpoint"]).parent for t in round2["per_fold"]["fold3"]["teachers"]] == \
        [student / "fold3", project.run / "fold3"]


def test_ensemble_refuses_runs_on_different_folds_files(project, tmp_path, main_cli, assert_cli_error):
    other = copy_run(project.run, tmp_path / "other", slim=True)
    info = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps(info | {"pseudo": {"folds_sha256": "1" * 64}}))
    proc = main_cli("ensemble", "--runs", project.run, "--runs", other, "--data", project.data,
                    "--out", tmp_path / "s.csv", "--device", "cpu")
    assert_cli_error(proc, str(other), "another folds file")
    assert not (tmp_path / "s.csv").exists()
    shutil.rmtree(other)
