"""`kagglecmr runs` (local leaderboard), `kagglecmr report RUN` (report.html) and TensorBoard logging,
on the session's trained tiny run and on copies of it with a fold missing."""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys

import cv2
import numpy as np
import pytest
from conftest import N_FOLDS, copy_run

from kagglecmr.engine.rundir import record_ensemble_oof
from kagglecmr.reports.leaderboard import config_diff, list_runs
from kagglecmr.utils.errors import ConfigError
from kagglecmr.utils.tracking import TB_DIR, Tracker

ROW_KEYS = {"name", "path", "differs", "folds_done", "folds_total", "folds_missing", "folds_unfinished", "metric", "full_fit", "fold_scores",
            "best_epochs", "fold_mean", "oof", "oof_last", "oof_tta", "oof_pp", "per_class", "parameters",
            "model_mb", "seconds_per_epoch", "train_minutes", "peak_memory_mb", "epochs", "device"}


def _json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def runs_dir(project, tmp_path_factory):
    """runs/tiny (finished), runs/tiny_no2 (fold 2 deleted), runs/tiny_no4 (the last fold deleted) and
    runs/tiny_unfinished (fold 3 without its summary.json, as while it trains)."""
    root = tmp_path_factory.mktemp("leaderboard") / "runs"
    copy_run(project.run, root / "tiny", slim=True)
    for name, k in (("tiny_no2", 2), ("tiny_no4", 4)):
        copy_run(project.run, root / name, slim=True)
        shutil.rmtree(root / name / f"fold{k}")
    copy_run(project.run, root / "tiny_unfinished", slim=True)
    (root / "tiny_unfinished" / "fold3" / "summary.json").unlink()  # a fold still training
    for leftover in root.glob("*/ensemble_oof.json"):  # other tests may have run ensemble on the shared run:
        leftover.unlink()  # these copies are runs no ensemble has seen yet
    for leftover in root.glob("*/postprocess.json"):
        leftover.unlink()
    return root


def _summaries(run):
    return {k: _json(run / f"fold{k}" / "summary.json") for k in range(N_FOLDS)}


# ------------------------------------------------------------------------------------ runs
def test_list_runs_reads_what_the_run_left(project, runs_dir):
    rows = {r["name"]: r for r in list_runs(runs_dir)}
    assert set(rows) == {"tiny", "tiny_no2", "tiny_no4", "tiny_unfinished"}
    r = rows["tiny"]
    assert set(r) == ROW_KEYS
    oof = _json(project.run / "oof.json")
    summaries = _summaries(project.run)
    env = _json(project.run / "fold0" / "env.json")
    assert r["oof"] == oof["score"] and r["per_class"] == oof["per_class"]
    assert r["metric"] == "dice"  # the demo data's default metric, recorded in oof.json
    assert r["folds_done"] == list(range(N_FOLDS)) and r["folds_total"] == N_FOLDS and r["folds_missing"] == []
    assert r["fold_scores"] == {str(k): s["best_score"] for k, s in summaries.items()}
    assert r["seconds_per_epoch"] == pytest.approx(np.mean([s["seconds_per_epoch"] for s in summaries.values()]))
    assert r["train_minutes"] == pytest.approx(sum(s["seconds"] for s in summaries.values()) / 60)
    assert r["parameters"] == env["parameters"] and r["device"] == env["device_name"]
    assert r["model_mb"] == pytest.approx((project.run / "fold0" / "best.safetensors").stat().st_size / 1e6, abs=0.01)
    assert r["oof_last"] == oof["score_last"]  # the fixed-epoch (last-epoch) OOF that train records
    assert r["oof_tta"] is None and r["oof_pp"] is None  # no ensemble has recorded them yet
    assert r["differs"]["model.encoder"] == "resnet18" and r["differs"]["train.epochs"] == 2
    assert "train.device" not in r["differs"] and "name" not in r["differs"]
    for name, k in (("tiny_no2", 2), ("tiny_no4", 4)):  # the last fold gone: the count comes from fold sizes
        m = rows[name]
        assert m["folds_missing"] == [k] and m["folds_total"] == N_FOLDS, name
        assert m["oof"] is None and m["per_class"] == {}  # oof.json is stale once a fold is gone
        assert m["fold_mean"] == pytest.approx(np.mean([s["best_score"] for j, s in summaries.items() if j != k]))
    u = rows["tiny_unfinished"]
    assert u["folds_missing"] == [3] and u["folds_unfinished"] == [3] and u["oof"] is None
    assert rows["tiny_no2"]["folds_unfinished"] == []
    rest = sorted(["tiny_no2", "tiny_no4", "tiny_unfinished"], key=lambda n: -rows[n]["fold_mean"])
    assert list(rows) == ["tiny", *rest]


def test_config_diff_dotted_keys():
    base = {"name": "a", "model": {"encoder": "r34", "params": {}}, "train": {"lr": 1e-3, "device": "auto"}}
    cfg = {"name": "b", "model": {"encoder": "r18", "params": {"depth": 3}}, "train": {"lr": 1e-3, "device": "cuda"}}
    assert config_diff(cfg, base) == {"model.encoder": "r18", "model.params.depth": 3}


def test_runs_cli_json_and_text(project, runs_dir, main_cli):
    proc = main_cli("runs", "--runs-dir", runs_dir, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows][0] == "tiny" and all(set(r) == ROW_KEYS for r in rows)
    assert rows[0]["oof"] == _json(project.run / "oof.json")["score"]

    proc = main_cli("runs", "--runs-dir", runs_dir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["run", "differs"] and len(lines) == 5
    assert lines[1].startswith("tiny ") and f"{rows[0]['oof']:.4f}" in lines[1] and "5/5" in lines[1]
    no2 = next(ln for ln in lines if ln.startswith("tiny_no2"))
    assert "4/5 (missing 2)" in no2 and "fold mean" in no2
    assert "4/5 (unfinished 3)" in next(ln for ln in lines if ln.startswith("tiny_unfinished"))
    assert "encoder=resnet18" in lines[1]


def test_runs_rich_table_on_a_terminal(runs_dir):
    import io

    from kagglecmr.reports.leaderboard import print_runs

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    print_runs(list_runs(runs_dir), file=out)
    text = out.getvalue()
    assert "┃" in text or "│" in text  # a rich table, not the plain text
    assert "tiny_no2" in text and "missing 2" in text


def test_runs_cli_errors_and_empty(tmp_path, main_cli, assert_cli_error):
    assert_cli_error(main_cli("runs", "--runs-dir", tmp_path / "nope"), "nope", "runs folder not found")
    (tmp_path / "empty").mkdir()
    proc = main_cli("runs", "--runs-dir", tmp_path / "empty", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == []


def test_ensemble_oof_scores_reach_the_leaderboard(project, tmp_path, main_cli):
    run = copy_run(project.run, tmp_path / "runs" / "tiny", slim=True)
    proc = main_cli("ensemble", "--runs", run, "--data", project.data, "--device", "cpu", "--split", "oof", "--tta",
                    "--tta-flips", "none,hflip", "--out", tmp_path / "oof.csv")
    assert proc.returncode == 0, proc.stderr
    printed = float(re.search(r"OOF Dice \(\d+ images, TTA none\+hflip\): ([0-9.]+)", proc.stdout).group(1))
    pp = float(re.search(r"postprocessing chosen on OOF: .* -> OOF Dice ([0-9.]+)", proc.stdout).group(1))
    entry = _json(run / "ensemble_oof.json")["entries"]["none+hflip"]
    assert entry["score"] == pytest.approx(printed, abs=5e-5) and entry["tta"] == ["none", "hflip"]
    assert entry["postprocess"]["score"] == pytest.approx(pp, abs=5e-5)
    assert entry["postprocess"]["plan"] == _json(run / "postprocess.json")
    (row,) = list_runs(tmp_path / "runs")
    assert row["oof_tta"] == entry["score"] and row["oof_pp"] == entry["postprocess"]["score"]


def test_record_ensemble_oof_merges_tta_sets(tmp_path):
    t = np.array([[1.0, 0.5], [0.0, 0.5]])
    record_ensemble_oof(tmp_path, ["none"], t)
    record_ensemble_oof(tmp_path, ["none", "hflip"], t * 0.5, t, {"1": {"kind": "largest"}})
    rec = _json(tmp_path / "ensemble_oof.json")["entries"]
    assert rec["none"] == {"score": 0.5, "per_class": {"1": 0.5, "2": 0.5}, "tta": ["none"], "images": 2}
    assert rec["none+hflip"]["score"] == 0.25 and rec["none+hflip"]["postprocess"]["score"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ensemble_oof.json"]


# ------------------------------------------------------------------------------------ report
def _images(page: str) -> list[np.ndarray]:
    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        img = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape[0] > 100
        out.append(img)
    return out


def test_report_on_a_finished_run(project, runs_dir, main_cli):
    run = runs_dir / "tiny"
    (run / "postprocess.json").write_text('{"1": {"kind": "largest"}, "2": {"kind": "none"}}')
    for _ in range(2):  # the second run replaces its own report
        proc = main_cli("report", run, "--data", project.data, "--worst", "6")
        assert proc.returncode == 0, proc.stderr
    page = (run / "report.html").read_text()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".", "report"))) == ["report.html"]
    assert len(_images(page)) == 3  # curves of all folds, per-class bars, worst OOF images
    assert "Worst 6 of 25 out-of-fold images" in page and "image with the true mask" in page
    for k, s in _summaries(project.run).items():
        assert re.search(rf"<td class=l>fold{k}</td><td class=l>finished</td><td>{s['best_epoch']}</td>"
                         rf"<td>{s['best_score']:.4f}</td>", page), k
    oof = _json(project.run / "oof.json")
    assert f"{oof['score']:.4f}" in page and all(f"{v:.4f}" in page for v in oof["per_class"].values())
    assert f"{_json(project.run / 'fold0' / 'env.json')['parameters']:,}" in page
    assert "1: largest, 2: none" in page  # the postprocessing plan


def test_report_with_a_missing_fold_and_without_data(project, runs_dir, main_cli, tmp_path):
    run = runs_dir / "tiny_no2"
    proc = main_cli("report", run)
    assert proc.returncode == 0, proc.stderr
    page = (run / "report.html").read_text()
    assert "4 of 5 folds finished; missing or unfinished: fold2" in page and "fold 2: missing" in page
    assert "no out-of-fold score yet" in page
    assert "pass --data" in page and len(_images(page)) == 2  # no images without the dataset, the rest shown
    main_cli("report", runs_dir / "tiny_unfinished")
    page = (runs_dir / "tiny_unfinished" / "report.html").read_text()
    assert "missing or unfinished: fold3" in page and "fold 3: unfinished (2 epochs)" in page
    (tmp_path / "bad").mkdir()
    main_cli("report", run, "--data", tmp_path / "bad")
    assert "images not shown" in (run / "report.html").read_text()


def test_report_errors(tmp_path, runs_dir, main_cli, assert_cli_error):
    assert_cli_error(main_cli("report", tmp_path / "nope"), "nope", "run folder not found")
    assert_cli_error(main_cli("report", runs_dir / "tiny_no4", "--worst", "0"), "--worst 0")
    assert not (runs_dir / "tiny_no4" / "report.html").exists()
    (tmp_path / "empty").mkdir()
    assert_cli_error(main_cli("report", tmp_path / "empty"), "no fold folders")
    assert not (tmp_path / "empty" / "report.html").exists()


# ------------------------------------------------------------------------------------ tensorboard
def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_tracker_writes_scalars_and_purges_on_resume(tmp_path):
    rows = [{"epoch": e, "lr": 0.1 / e, "train_loss": 1.0 / e, "val_loss": 2.0 / e, "val_dice": 0.1 * e,
             "dice_1": 0.2 * e, "dice_2": float("nan"), "best": True, "time_s": 1.5} for e in (1, 2, 3)]
    t = Tracker(tmp_path, ["csv", "tensorboard"])
    for r in rows:
        t.epoch(r)
    t.close()
    t = Tracker(tmp_path, ["tensorboard"], start_epoch=2)  # resumed after epoch 2: epoch 3 is replayed
    t.epoch(rows[2] | {"val_dice": 0.9})
    t.close()
    s = _scalars(tmp_path / TB_DIR)
    assert set(s) == {"loss/train", "loss/val", "dice/val", "dice/class_1", "lr", "time/epoch_s"}  # NaN left out
    assert s["loss/train"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert s["dice/val"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.9))]
    assert not Tracker(tmp_path / "csv_only", ["csv"]).writer and not (tmp_path / "csv_only").exists()


def test_tensorboard_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"train.log: .*pip install tensorboard"):
        Tracker(tmp_path, ["csv", "tensorboard"])


@pytest.mark.slow
def test_training_with_tensorboard_logs_every_epoch(project, tmp_path, one_torch_thread):
    from kagglecmr.cfg.config import load_config
    from kagglecmr.engine.orchestrate import run_train

    cfg = load_config(project.config, ["train.log=[csv,tensorboard]", "train.epochs=2"])
    run_train(cfg, fold_spec="1", data_root=project.data, folds_path=project.folds, name="tb", runs_dir=tmp_path,
              device="cpu", force=False, quiet=True)
    fold = tmp_path / "tb" / "fold1"
    s = _scalars(fold / TB_DIR)
    assert {"loss/train", "loss/val", "dice/val", "dice/class_1", "dice/class_2", "dice/class_3", "lr",
            "time/epoch_s"} <= set(s)
    import pandas as pd

    metrics = pd.read_csv(fold / "metrics.csv")
    assert [st for st, _ in s["dice/val"]] == [1, 2]
    np.testing.assert_allclose([v for _, v in s["dice/val"]], metrics["val_dice"], atol=1e-6)
    np.testing.assert_allclose([v for _, v in s["loss/train"]], metrics["train_loss"], atol=1e-6)


def test_corrupt_files_make_the_page_say_less_not_fail(project, tmp_path, main_cli):
    run = copy_run(project.run, tmp_path / "runs" / "tiny", slim=True)
    (run / "fold1" / "oof.npz").write_bytes(b"not a zip")
    (run / "fold3" / "summary.json").write_text("[")
    (run / "fold0" / "config.yaml").write_text("{{{")
    (run / "postprocess.json").write_text("nope")
    proc = main_cli("runs", "--runs-dir", tmp_path / "runs", "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["folds_unfinished"] == [3] and row["differs"]["model.encoder"] == "resnet18"  # fold1's config
    proc = main_cli("report", run, "--data", project.data)
    assert proc.returncode == 0, proc.stderr
    page = (run / "report.html").read_text()
    assert "fold 3: unfinished" in page and "Worst 12 of 20 out-of-fold images" in page  # fold1 unreadable
    assert "postprocess.json" in page  # the plan's one-line error, shown on the page
