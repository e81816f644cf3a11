"""One loader: every command reads ``--data`` through the dataset loader, so one small dataset given three ways
(the folder form, a dataset file with the folder's patterns, a dataset file with another layout and its masks
as a run-length labels CSV) gives the same folds, training metrics, scores, submissions, pseudo labels, export,
predictions and reports.  Plus the defects found reading pseudo-label and export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from kagglecmr.cfg.config import load_config
from kagglecmr.data.demo import make_demo_dataset
from kagglecmr.engine import pseudo as pl
from kagglecmr.engine.exporter import export_ensemble
from kagglecmr.engine.pseudo import _replace_dir
from kagglecmr.formats.submission import CMR
from kagglecmr.formats.submission_csv import write_submission
from kagglecmr.utils.errors import KaggleCMRError

CFG = """\
seed: 3
model: {arch: Unet, encoder: resnet18, weights: none, params: {encoder_depth: 3, decoder_channels: [8, 8, 4]}}
loss: {name: dice_ce}
augment: {hflip: 0.5, vflip: 0.0, affine: 0.0, rotate: 0, intensity: 0.0, gamma: 0.0}
train: {epochs: 1, batch_size: 4, lr: 0.003, warmup_epochs: 0, amp: none, val_batch_size: 8, threads: 1}
infer: {tta: [none, hflip]}
"""
FOLDER_PATTERNS = """\
splits:
  train: {image: "train/image/{id}.png", mask: "train/mask/{id}_mask.png"}
  val: {image: "val/image/{id}.png", mask: "val/mask/{id}_mask.png"}
  test: {image: "test/image/{id}.png"}
"""


def _three_ways(tmp: Path) -> dict[str, Path]:
    folder = tmp / "folder"
    make_demo_dataset(folder, n_train=10, n_val=5, n_test=4, seed=5, size=32)
    same = tmp / "same.yaml"
    same.write_text(f"name: same\nroot: folder\n{FOLDER_PATTERNS}")
    # another layout: every image in one flat folder per split with a prefix, masks as a run-length CSV
    other = tmp / "other"
    for split in ("train", "val", "test"):
        for p in sorted((folder / split / "image").glob("*.png")):
            dst = other / "pictures" / f"{split}-{p.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
    import cv2

    for split in ("train", "val"):
        rows = []
        for p in sorted((folder / split / "mask").glob("*_mask.png")):
            rows += CMR.rows(p.name[:-len("_mask.png")], cv2.imread(str(p), cv2.IMREAD_UNCHANGED), 4)
        write_submission(rows, other / f"{split}_labels.csv", shape=(32, 32))
    layout = tmp / "other.yaml"
    layout.write_text(
        "name: other\nroot: other\nsplits:\n"
        '  train: {image: "pictures/train-{id}.png", mask: "train_labels.csv"}\n'
        '  val: {image: "pictures/val-{id}.png", mask: "val_labels.csv"}\n'
        '  test: {image: "pictures/test-{id}.png"}\n'
        "submission: {id: '{id}_mask{class}', header: [id, encoding], order: column, start: 1, classes: [1, 2, 3]}\n")
    return {"folder": folder, "same": same, "other": layout}


def _metrics(run: Path) -> list[pd.DataFrame]:
    out = []
    for f in sorted(run.glob("fold*/metrics.csv")):
        df = pd.read_csv(f)
        out.append(df.drop(columns=[c for c in df.columns if c.endswith("_s")]))
    return out


@pytest.mark.slow
def test_every_command_reads_a_dataset_given_three_ways_the_same(tmp_path, main_cli, cli):
    datas = _three_ways(tmp_path)
    (tmp_path / "tiny.yaml").write_text(CFG)
    out = {}
    for way, data in datas.items():
        r = {}
        folds, runs = tmp_path / f"{way}-folds.csv", tmp_path / f"{way}-runs"
        for args in (["make-folds", "--data", data, "--out", folds],
                     ["train", "--fold", "0..4", "--config", tmp_path / "tiny.yaml", "--data", data, "--folds", folds,
                      "--name", "r", "--runs-dir", runs, "--quiet", "--device", "cpu"],
                     ["ensemble", "--runs", runs / "r", "--data", data, "--split", "oof,test", "--tta", "--device", "cpu"],
                     ["pseudo-label", "--runs", runs / "r", "--data", data, "--out", tmp_path / f"{way}-pseudo",
                      "--device", "cpu", "--confidence", "0.3"],
                     ["export", "--runs", runs / "r", "--data", data, "--format", "torchscript",
                      "--out", tmp_path / f"{way}.pt"],
                     ["predict", tmp_path / "folder" / "test" / "image", "--runs", runs / "r",
                      "--out", tmp_path / f"{way}-pred", "--device", "cpu"],
                     ["report", runs / "r", "--data", data]):
            proc = main_cli(*args, cwd=tmp_path)
            assert proc.returncode == 0, (way, args[0], proc.stderr[-2000:])
        oof = sorted(tmp_path.glob("submissions/r-oof-*.csv"))[-1]
        test = sorted(tmp_path.glob("submissions/r-test-*.csv"))[-1]
        score = main_cli("score", oof, "--data", data, "--json")
        assert score.returncode == 0, score.stderr
        enc = main_cli("encode", tmp_path / "folder" / "val" / "mask", "--data", data, "--out", tmp_path / f"{way}-enc.csv")
        assert enc.returncode == 0, enc.stderr
        r["folds"] = folds.read_bytes()
        r["metrics"] = _metrics(runs / "r")
        r["oof"], r["test"] = oof.read_bytes(), test.read_bytes()
        oof.rename(tmp_path / f"{way}-oof.csv"), test.rename(tmp_path / f"{way}-test.csv")
        r["score"] = json.loads(score.stdout)
        r["encode"] = (tmp_path / f"{way}-enc.csv").read_bytes()
        manifest = json.loads((tmp_path / f"{way}-pseudo" / "manifest.json").read_text())
        r["pseudo"] = {k: v["per_image"] for k, v in manifest["per_fold"].items()}
        r["pseudo_masks"] = {p.relative_to(tmp_path / f"{way}-pseudo").as_posix(): p.read_bytes()
                             for p in sorted((tmp_path / f"{way}-pseudo").rglob("*_mask.png"))}
        r["export_error"] = json.loads((tmp_path / f"{way}.pt.json").read_text())["checked_on"].split(" of ")[0]
        r["predict"] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"{way}-pred").glob("*.png"))}
        assert (runs / "r" / "report.html").is_file()
        out[way] = r
    ref = out["folder"]
    assert len(ref["metrics"]) == 5 and ref["pseudo_masks"] and len(ref["predict"]) == 4
    for way in ("same", "other"):
        got = out[way]
        assert got["folds"] == ref["folds"], way
        for a, b in zip(got["metrics"], ref["metrics"]):
            pd.testing.assert_frame_equal(a, b)
        for key in ("oof", "test", "score", "encode", "pseudo", "pseudo_masks", "export_error", "predict"):
            assert got[key] == ref[key], (way, key)


# ------------------------------------------------------------------------------------------ pseudo-label
def test_pseudo_label_predicts_every_teacher_model_once(project, tmp_path, monkeypatch):
    calls = []
    real = pl._model_probs
    monkeypatch.setattr(pl, "_model_probs", lambda path, *a, **k: calls.append(Path(path)) or real(path, *a, **k))
    manifest = pl.pseudo_label(runs=[project.run], data_root=project.data, out=tmp_path / "p", device="cpu")
    assert len(calls) == len(set(calls)) == 5  # five fold models, each once (no full fit in this run)
    fold_files = {Path(t["checkpoint"]) for k in range(5) for t in manifest["per_fold"][f"fold{k}"]["teachers"]}
    assert {Path(t["checkpoint"]) for t in manifest["per_fold"]["full"]["teachers"]} == fold_files == set(calls)


def test_pseudo_label_labels_equal_the_per_fold_teacher_probabilities(project, tmp_path):
    """The single pass gives exactly the labels of predicting each fold (and all) separately."""
    manifest = pl.pseudo_label(runs=[project.run], data_root=project.data, out=tmp_path / "p", device="cpu",
                               confidence=0.0)
    from kagglecmr.data.dataset import load_dataset

    images = load_dataset(project.data).load("test", labelled=False).images
    import cv2

    for fold in (0, 3, "all"):
        probs, _ = pl.teacher_probs([project.run], fold, images, pl.resolve_device("cpu"), ["none"], 8)
        root = pl.pseudo_fold_dir(tmp_path / "p", fold)
        for i, ident in enumerate(load_dataset(project.data).load("test", labelled=False).ids):
            m = cv2.imread(str(root / "train" / "mask" / f"{ident}_mask.png"), cv2.IMREAD_UNCHANGED)
            assert (m == probs[i].argmax(0)).mean() > 0.999  # float summation order may flip exact ties
    assert manifest["confidence"] == 0.0


def test_replace_dir_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path):
    out, new = tmp_path / "out", tmp_path / ".new"
    (out / "fold0").mkdir(parents=True)
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    _replace_dir(new, out)
    assert (out / "new.txt").read_text() == "new" and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside
    # the move of the new folder fails: the old one is put back whole
    with pytest.raises(OSError):
        _replace_dir(tmp_path / "missing", out)
    assert (out / "new.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------------------ export
def test_export_of_a_context_run_is_one_line(tmp_path):
    cfg = load_config("demo", ["data.context=partner"])
    pred = SimpleNamespace(runs=[SimpleNamespace(path=tmp_path / "runs" / "ctx", cfg=cfg)])
    with pytest.raises(KaggleCMRError) as info:
        export_ensemble(pred, tmp_path / "m.pt", "torchscript")
    msg = str(info.value)
    assert "\n" not in msg and "runs/ctx" in msg and "data.context: partner" in msg
    assert not (tmp_path / "m.pt").exists()


def test_export_refuses_an_exported_file_as_runs(tmp_path, main_cli, assert_cli_error):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not a run")
    proc = main_cli("export", "--runs", model, "--out", tmp_path / "again.pt", "--format", "torchscript")
    assert_cli_error(proc, "model.onnx", "not a run folder")
    assert not (tmp_path / "again.pt").exists()


def test_score_of_a_folder_reads_it_as_a_dataset(project, tmp_path, main_cli):
    """score --data FOLDER and score --data FILE.yaml (the folder's patterns) agree: one loader."""
    sub = tmp_path / "s.csv"
    rng = np.random.default_rng(0)
    from kagglecmr.data.dataset import load_dataset

    ids = load_dataset(project.data).load("val").ids
    rows = [row for i in ids for row in CMR.rows(i, rng.integers(0, 4, (96, 96)), 4)]
    write_submission(rows, sub, shape=(96, 96))
    spec = tmp_path / "d.yaml"
    spec.write_text(f"root: {project.data}\n{FOLDER_PATTERNS}")
    a, b = main_cli("score", sub, "--data", project.data, "--json"), main_cli("score", sub, "--data", spec, "--json")
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["score"] == json.loads(b.stdout)["score"] > 0
