"""``kagglecmr ensemble``: submission CSVs, round trips, flip TTA, out-of-fold score, postprocessing, errors.

Uses the session's tiny 5-fold run (``conftest.project``); commands that write into a run folder
(``--postprocess auto`` saves ``postprocess.json``) work on a slim copy of it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import N_FOLDS, N_TEST, copy_run, tree_snapshot, truth_masks

from kagglecmr.cfg.config import Config
from kagglecmr.data.dataset import load_dataset
from kagglecmr.data.loader import read_mask
from kagglecmr.engine import ensemble_split
from kagglecmr.engine import ensembler as ensemble
from kagglecmr.engine.infer import TTA_FLIPS, TTA_PASSES, predict_proba, tta_apply, tta_undo
from kagglecmr.engine.postprocess import apply_plan, load_plan, tune_plan
from kagglecmr.formats.metric import dice_table
from kagglecmr.formats.submission_csv import read_submission
from kagglecmr.models.checkpoint import load_best
from kagglecmr.models.factory import build_model
from kagglecmr.utils.errors import ConfigError
from kagglecmr.utils.naming import natural_sorted

CPU = torch.device("cpu")
TEST_IDS = [f"cmr{i}" for i in range(26, 26 + N_TEST)]  # demo ids run on across train (20), val (5), test


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def fold_models(project):
    """The run's fold models, loaded here without kagglecmr.engine.ensembler."""
    models = []
    for k in range(N_FOLDS):
        sd, meta = load_best(project.run / f"fold{k}" / "best.safetensors")
        model = build_model(Config.model_validate(meta["config"]), weights="none", check_size=False)
        model.load_state_dict(sd)
        models.append(model.eval())
    return models


@torch.no_grad()
def softmax_of(model, images: np.ndarray) -> np.ndarray:
    """Plain float32 softmax of uint8 ``[N, H, W, C]`` images (no batching, no channels_last, no TTA)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return torch.softmax(model(x).float(), 1).numpy()


def assert_labels_match(pred: np.ndarray, probs: np.ndarray, tol: float = 1e-4) -> None:
    """``pred`` is the argmax of ``probs`` wherever the top two classes are more than ``tol`` apart."""
    ref = probs.argmax(1)
    top2 = np.sort(probs, axis=1)[:, -2:]
    ambiguous = (top2[:, 1] - top2[:, 0]) <= tol
    bad = (pred != ref) & ~ambiguous
    assert not bad.any(), f"{int(bad.sum())} pixels differ from the argmax"
    assert (pred == ref).mean() > 0.999


def read_mask_dir(folder: Path, ids) -> np.ndarray:
    return np.stack([read_mask(Path(folder) / f"{i}_mask.png") for i in ids])



def oof_labels(project, fold_models) -> tuple[list[str], np.ndarray]:
    """Each labelled image predicted by the fold model that held it out (ids from the folds CSV)."""
    df = pd.read_csv(project.folds, dtype={"id": str})
    ids, preds = [], []
    for k, model in enumerate(fold_models):
        fids = df.loc[df["fold"] == k, "id"].tolist()
        images = np.stack([cv2.imread(str(_image_path(project, i)), cv2.IMREAD_GRAYSCALE)[..., None] for i in fids])
        ids += fids
        preds.append(softmax_of(model, images))
    return ids, np.concatenate(preds)


def _image_path(project, image_id: str) -> Path:
    for split in ("train", "val", "test"):
        p = project.data / split / "image" / f"{image_id}.png"
        if p.is_file():
            return p
    raise FileNotFoundError(image_id)


def ens_args(project, *extra, run=None) -> list:
    return ["ensemble", "--runs", run or project.run, "--data", project.data, "--device", "cpu", *extra]


def demo_test_images(project) -> np.ndarray:
    return np.asarray(load_dataset(project.data).load("test", labelled=False).images)  # (the cache's lazy rows)


# ------------------------------------------------------------------------------------ submission CSV
def test_test_split_with_tta_default_names_never_overwrite(project, tmp_path, cli, main_cli, assert_cli_error):
    run = copy_run(project.run, tmp_path / "runs" / "tiny", slim=True)
    work = tmp_path / "work"
    work.mkdir()
    first = cli(*ens_args(project, "--split", "test", "--tta", run=run), cwd=work)
    assert first.returncode == 0, first.stderr
    assert "TTA none+hflip+vflip+hvflip" in first.stdout  # the config's infer.tta
    second = cli(*ens_args(project, "--split", "test", "--postprocess", "none", run=run), cwd=work)
    assert second.returncode == 0, second.stderr
    files = sorted((work / "submissions").glob("*.csv"))
    assert len(files) == 2 and all(f.name.startswith("tiny-test-") for f in files)

    for f in files:
        rows = read_submission(f, shape=(96, 96))
        expected = [f"{i}_mask{k}" for i in natural_sorted(TEST_IDS) for k in (1, 2, 3)]
        assert list(rows) == expected  # 3 rows per test image, natural order

    existing = files[0]
    before = existing.read_bytes()
    run_before = tree_snapshot(run)
    proc = main_cli(*ens_args(project, "--split", "test", "--out", existing, run=run), cwd=work)
    assert_cli_error(proc, str(existing), "already exists")
    assert existing.read_bytes() == before
    assert tree_snapshot(run) == run_before  # not even postprocess.json
    assert len(list((work / "submissions").glob("*.csv"))) == 2


def test_default_name_within_one_second_gets_a_new_file(project, tmp_path, monkeypatch):
    """Two ensembles stamped with the same second still write two files."""
    from datetime import datetime

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2030, 1, 2, 3, 4, 5)

    monkeypatch.setattr(ensemble_split, "datetime", Frozen)  # where submission names are stamped
    monkeypatch.chdir(tmp_path)
    outs = [ensemble.run_ensemble(runs=[project.run], runs_dir=project.runs_dir, data_root=project.data,
                                  split="test", tta=False, tta_flips=None, out=None, save_masks=None,
                                  postprocess="none", weights=None, device="cpu")["out"] for _ in range(2)]
    assert outs[0] != outs[1]
    first = (tmp_path / outs[0]).read_bytes()
    assert (tmp_path / outs[1]).read_bytes() == first  # same prediction, nothing overwritten
    assert Path(outs[0]).parent == Path("submissions") and "20300102-030405" in outs[0]
    assert sorted(p.name for p in (tmp_path / "submissions").iterdir()) == sorted(Path(o).name for o in outs)


def test_val_round_trip_scores_exactly_one(project, tmp_path, cli, main_cli):
    masks, csv = tmp_path / "val_masks", tmp_path / "val.csv"
    proc = cli(*ens_args(project, "--split", "val", "--save-masks", masks, "--postprocess", "none", "--out", csv))
    assert proc.returncode == 0, proc.stderr
    val_ids = [f"cmr{i}" for i in range(21, 26)]
    assert sorted(p.name for p in masks.iterdir()) == sorted(f"{i}_mask.png" for i in val_ids)
    pred = read_mask_dir(masks, val_ids)
    assert set(np.unique(pred)) <= {0, 1, 2, 3} and len(np.unique(pred)) > 1
    sheet = ensemble.contact_sheet_path(masks)
    assert sheet.is_file() and cv2.imread(str(sheet)) is not None

    scored = cli("score", csv, "--truth", masks, "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["score"] == 1.0

    # the printed val Dice is the CSV's leaderboard score against the real masks
    real = main_cli("score", csv, "--data", project.data, "--json")
    assert real.returncode == 0, real.stderr
    val_line = next(line for line in proc.stdout.splitlines() if line.startswith("val Dice:"))
    assert val_line.split()[2] == f"{json.loads(real.stdout)['score']:.4f}"


# ------------------------------------------------------------------------------------ TTA
def test_identity_only_tta_equals_plain_prediction(project, fold_models):
    images = demo_test_images(project)
    for model in fold_models[:2]:
        plain = predict_proba(model, images, CPU)
        ident = predict_proba(model, images, CPU, tta=("none",))
        np.testing.assert_array_equal(ident, plain)
        np.testing.assert_allclose(plain, softmax_of(model, images), atol=1e-5)

    run = ensemble.load_run(project.run, CPU)
    passes = ensemble.tta_passes([run], True, ["none"])
    assert passes == ["none"] == ensemble.tta_passes([run], False, None)
    with_tta = ensemble.predict_images([run], images, CPU, passes, np.ones(1), 64)
    without = ensemble.predict_images([run], images, CPU, ensemble.tta_passes([run], False, None), np.ones(1), 64)
    np.testing.assert_array_equal(with_tta, without)
    # the real (not flip-equivariant) models do change under the full flip set
    full = ensemble.predict_images([run], images, CPU, list(TTA_FLIPS), np.ones(1), 64)
    assert np.abs(full - without).max() > 1e-3


class Pointwise(torch.nn.Module):
    """Per-pixel function of the input (1x1 convs): commutes with every flip."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(1, 8, 1)
        self.b = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x * 6 - 3))) * 5


class WithPositionBias(Pointwise):
    """Adds a fixed, asymmetric per-position bias: NOT flip-equivariant."""

    def __init__(self, size: int = 96):
        super().__init__()
        self.register_buffer("bias", torch.randn(1, 4, size, size) * 2)

    def forward(self, x):
        return super().forward(x) + self.bias


def _toy_images(n: int = 5) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (n, 96, 96, 1), dtype=np.uint8)


def test_flip_tta_is_exact_on_a_flip_equivariant_model():
    torch.manual_seed(0)
    model = Pointwise().eval()
    images = _toy_images()
    plain = predict_proba(model, images, CPU, batch_size=2)
    assert plain.std(axis=(2, 3)).min() > 1e-2  # spatially varying, so the flips are not trivially harmless
    for flips in (["hflip"], ["vflip"], ["none", "hflip", "vflip", "hvflip"]):
        np.testing.assert_allclose(predict_proba(model, images, CPU, tta=flips, batch_size=2), plain, atol=1e-6)


def test_flip_tta_averages_unflipped_predictions_of_a_non_equivariant_model():
    torch.manual_seed(0)
    model = WithPositionBias().eval()
    images = _toy_images()
    flips = ["none", "hflip", "vflip", "hvflip"]
    plain = predict_proba(model, images, CPU)
    tta = predict_proba(model, images, CPU, tta=flips, batch_size=2)
    assert np.abs(tta - plain).max() > 1e-2

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    manual = []
    with torch.no_grad():
        for dims in ((), (-1,), (-2,), (-2, -1)):
            xi = x.flip(dims) if dims else x
            p = torch.softmax(model(xi), 1)
            manual.append(p.flip(dims) if dims else p)
    np.testing.assert_allclose(tta, torch.stack(manual).mean(0).numpy(), atol=1e-6)
    # a single flip alone is its own un-flipped prediction
    h = predict_proba(model, images, CPU, tta=["hflip"])
    np.testing.assert_allclose(h, manual[1].numpy(), atol=1e-6)


def test_d4_passes_undo_exactly_and_are_the_eight_symmetries():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)  # non-square: the turns swap height and width
    seen = set()
    for name in TTA_PASSES:
        y = tta_apply(x, name)
        assert torch.equal(tta_undo(y, name), x), name
        seen.add((tuple(y.shape), tuple(y.flatten().tolist())))
    assert len(TTA_PASSES) == 8 and len(seen) == 8
    assert torch.equal(tta_apply(x, "transpose"), x.transpose(-2, -1))
    assert torch.equal(tta_apply(x, "rot90"), torch.rot90(x, 1, (-2, -1)))


def test_d4_tta_is_exact_on_an_equivariant_model_and_averages_turned_predictions():
    torch.manual_seed(0)
    images = _toy_images()
    model = Pointwise().eval()
    plain = predict_proba(model, images, CPU)
    np.testing.assert_allclose(predict_proba(model, images, CPU, tta=list(TTA_PASSES), batch_size=2), plain, atol=1e-6)
    biased = WithPositionBias().eval()
    tta = predict_proba(biased, images, CPU, tta=["rot90", "transpose"], batch_size=2)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        a = torch.rot90(torch.softmax(biased(torch.rot90(x, 1, (-2, -1))), 1), -1, (-2, -1))
        b = torch.softmax(biased(x.transpose(-2, -1)), 1).transpose(-2, -1)
    np.testing.assert_allclose(tta, ((a + b) / 2).numpy(), atol=1e-6)
    assert np.abs(tta - predict_proba(biased, images, CPU)).max() > 1e-2


def test_turned_tta_on_a_run_never_trained_with_rot90_warns(project, capsys):
    run = ensemble.load_run(project.run, CPU)
    assert run.cfg.augment.rot90 == 0
    assert ensemble.tta_passes([run], True, ["none", "rot90"]) == ["none", "rot90"]
    assert "rot90" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unknown pass 'rot45'"):
        ensemble.tta_passes([run], True, ["rot45"])


# ------------------------------------------------------------------------------------ out of fold
def test_oof_split_score_equals_training_oof(project, tmp_path, main_cli, labelled):
    oof = json.loads((project.run / "oof.json").read_text())
    csv = tmp_path / "oof.csv"
    proc = main_cli(*ens_args(project, "--split", "oof", "--postprocess", "none", "--out", csv))
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"OOF Dice \((\d+) images, TTA none\): (\d\.\d{4})", proc.stdout)
    assert m, proc.stdout
    assert int(m[1]) == 25 and m[2] == f"{oof['score']:.4f}"

    empty = sum(int(not (mask == k).any()) for mask in labelled.masks for k in (1, 2, 3))
    assert f"OOF empty truth rows: {empty} of 75" in proc.stdout

    # the CSV, scored like the leaderboard against the labelled masks, is the training run's OOF score
    scored = main_cli("score", csv, "--data", project.data, "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["score"] == pytest.approx(oof["score"], abs=1e-6)

    # library level, full precision
    run = ensemble.load_run(project.run, CPU)
    probs = ensemble.predict_oof([run], labelled, CPU, ["none"], np.ones(1), 64)
    table = dice_table(probs.argmax(1), labelled.masks, 4)
    assert table.mean() == pytest.approx(oof["score"], abs=1e-6)


# ------------------------------------------------------------------------------------ postprocessing
def test_postprocessing_auto_plan_and_none(project, tmp_path, main_cli, fold_models):
    run = copy_run(project.run, tmp_path / "runs" / "tiny", slim=True)
    images = demo_test_images(project)

    # none: the raw argmax of the fold-averaged softmax; nothing written into the run
    raw_dir = tmp_path / "raw"
    proc = main_cli(*ens_args(project, "--split", "test", "--postprocess", "none", "--save-masks", raw_dir,
                         "--out", tmp_path / "raw.csv", run=run))
    assert proc.returncode == 0, proc.stderr
    assert not (run / "postprocess.json").exists()
    raw = read_mask_dir(raw_dir, TEST_IDS)
    mean_probs = np.mean([softmax_of(m, images) for m in fold_models], axis=0)
    assert_labels_match(raw, mean_probs)

    # auto: tuned on the OOF predictions and saved with the run
    auto_dir = tmp_path / "auto"
    proc = main_cli(*ens_args(project, "--split", "test", "--postprocess", "auto", "--save-masks", auto_dir,
                         "--out", tmp_path / "auto.csv", run=run))
    assert proc.returncode == 0, proc.stderr
    assert "postprocessing chosen on OOF" in proc.stdout
    saved = json.loads((run / "postprocess.json").read_text())
    ids, oof_probs = oof_labels(project, fold_models)
    expected, _, _, _ = tune_plan(oof_probs.argmax(1).astype(np.uint8), truth_masks(project, ids), 4)
    assert saved == expected
    np.testing.assert_array_equal(read_mask_dir(auto_dir, TEST_IDS), apply_plan(raw, saved, 4))

    # a plan file: applied as given (and no OOF tuning)
    plan_path = tmp_path / "plan.json"
    plan = {"1": {"kind": "largest"}, "2": {"kind": "largest"}, "3": {"kind": "min_area", "area": 30}}
    plan_path.write_text(json.dumps(plan))
    plan_dir = tmp_path / "plan"
    proc = main_cli(*ens_args(project, "--split", "test", "--postprocess", plan_path, "--save-masks", plan_dir,
                         "--out", tmp_path / "plan.csv", run=run))
    assert proc.returncode == 0, proc.stderr
    assert "postprocessing from" in proc.stdout and "chosen on OOF" not in proc.stdout
    planned = read_mask_dir(plan_dir, TEST_IDS)
    np.testing.assert_array_equal(planned, apply_plan(raw, load_plan(plan_path, 4), 4))
    assert not np.array_equal(planned, raw)  # the plan did remove something


# ------------------------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def err_run(project, tmp_path_factory):
    """A slim copy for the error cases, so a regression that writes before failing cannot touch the shared run."""
    return copy_run(project.run, tmp_path_factory.mktemp("err") / "tiny", slim=True)


@pytest.fixture
def broken_run(project, tmp_path):
    run = copy_run(project.run, tmp_path / "broken" / "tiny", slim=True)
    (run / "fold2" / "best.safetensors").unlink()
    return run


@pytest.fixture
def data_without_val(project, tmp_path):
    data = tmp_path / "noval"
    shutil.copytree(project.data, data, ignore=lambda d, names: ["val"] if Path(d) == project.data else [])
    return data


@pytest.mark.parametrize("case", ["missing_fold", "no_run_folder", "no_val", "weights", "tta_flip", "no_runs",
                                  "no_runs_dir"])
def test_errors(project, err_run, tmp_path, main_cli, assert_cli_error, request, case):
    work = tmp_path / "work"
    work.mkdir()
    common = ["--data", project.data, "--device", "cpu"]
    if case == "missing_fold":
        run = request.getfixturevalue("broken_run")
        args, needles = ["ensemble", "--runs", run, *common], [run, "fold 2", "missing"]
    elif case == "no_run_folder":
        args, needles = ["ensemble", "--runs", tmp_path / "nope", *common], ["nope", "not found"]
    elif case == "no_val":
        data = request.getfixturevalue("data_without_val")
        args = ["ensemble", "--runs", err_run, "--data", data, "--split", "val"]
        needles = ["noval", "split 'val'"]
    elif case == "weights":
        args = ["ensemble", "--runs", err_run, "--weights", "1", "--weights", "2", *common]
        needles = ["--weights", "need 1"]
    elif case == "tta_flip":
        args, needles = ["ensemble", "--runs", err_run, "--tta-flips", "none,rot45", *common], ["rot45"]
    elif case == "no_runs":
        (tmp_path / "empty_runs").mkdir()
        args, needles = ["ensemble", "--runs-dir", tmp_path / "empty_runs", *common], ["no trained runs"]
    else:
        args, needles = ["ensemble", "--runs-dir", tmp_path / "missing_runs", *common], ["no trained runs"]
    before = tree_snapshot(err_run)
    assert_cli_error(main_cli(*args, cwd=work), *needles)
    assert list(work.iterdir()) == []  # no submissions/ written
    assert tree_snapshot(err_run) == before


# ------------------------------------------------------------------------------------ several runs
def test_same_run_twice_with_equal_weights_equals_one_run(project, tmp_path, main_cli):
    run = copy_run(project.run, tmp_path / "runs" / "tiny", slim=True)
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    proc = main_cli(*ens_args(project, "--split", "test", "--out", one, run=run))
    assert proc.returncode == 0, proc.stderr
    proc = main_cli("ensemble", "--runs", run, "--runs", run, "--weights", "1", "--weights", "1", "--data", project.data,
               "--split", "test", "--device", "cpu", "--out", two)
    assert proc.returncode == 0, proc.stderr
    assert "ensemble of 10 models" in proc.stdout
    assert two.read_bytes() == one.read_bytes()


# ------------------------------------------------------------------------------------ several splits, one load
def test_several_splits_from_one_load_equal_separate_calls(project, tmp_path, main_cli, assert_cli_error,
                                                           monkeypatch):
    run = copy_run(project.run, tmp_path / "runs" / "tiny", slim=True)
    sep, multi = tmp_path / "sep", tmp_path / "multi"
    sep.mkdir(), multi.mkdir()
    for split in ("oof", "test"):
        proc = main_cli(*ens_args(project, "--split", split, "--tta", "--out", sep / f"{split}.csv", run=run))
        assert proc.returncode == 0, proc.stderr
    proc = main_cli(*ens_args(project, "--split", "oof,test", "--tta", run=run), cwd=multi)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ensemble of") == 1 and proc.stdout.count("OOF Dice (") == 1  # one load, one OOF pass
    written = sorted((multi / "submissions").glob("*.csv"))
    assert [p.name.split("-")[1] for p in written] == ["oof", "test"]
    for p in written:
        assert p.read_bytes() == (sep / f"{p.name.split('-')[1]}.csv").read_bytes()

    # the library function takes runs already loaded; repeating --split works like a comma list
    from kagglecmr.engine.ensembler import load_run, run_ensemble

    monkeypatch.chdir(multi)
    loaded = [load_run(run, torch.device("cpu"), with_full=True)]
    res = run_ensemble(runs=None, runs_dir=tmp_path, data_root=project.data, split=["test", "val"], tta=True,
                       tta_flips=None, out=None, save_masks=tmp_path / "masks", postprocess="auto", weights=None,
                       device="cpu", loaded=loaded)
    assert set(res) == {"test", "val"}
    assert Path(res["test"]["out"]).read_bytes() == (sep / "test.csv").read_bytes()
    assert len(list((tmp_path / "masks" / "val").glob("*_mask.png"))) == 5
    Path(res["test"]["out"]).unlink(), Path(res["val"]["out"]).unlink()
    proc = main_cli(*ens_args(project, "--split", "test", "--split", "val", "--postprocess", "none", run=run), cwd=multi)
    assert proc.returncode == 0 and proc.stdout.count("wrote ") == 2, proc.stderr

    assert_cli_error(main_cli(*ens_args(project, "--split", "oof,test", "--out", tmp_path / "x.csv", run=run)),
                     "--out", "2 splits")
    assert_cli_error(main_cli(*ens_args(project, "--split", "test,test", run=run)), "test,test", "once")
    assert_cli_error(main_cli(*ens_args(project, "--split", "oof,tst", run=run)), "--split tst", "expected")
