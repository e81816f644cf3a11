"""The Python API (``import kagglecmr as kc``): same results as the CLI, cheap import, plain progress
output off a terminal, the notebook example."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import kagglecmr as kc
from kagglecmr.utils.errors import ConfigError, KaggleCMRError

ROOT = Path(__file__).resolve().parents[1]
ANSI = "\x1b["


def test_import_is_cheap_and_verbs_are_plain_functions():
    code = ("import sys, inspect, pickle, kagglecmr as kc, kagglecmr.api as api; "
            "verbs = [getattr(kc, v) for v in api.__all__ if v[0].islower()]; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert all(inspect.isfunction(v) for v in verbs), [v for v in verbs if not inspect.isfunction(v)]; "
            "assert all(pickle.loads(pickle.dumps(v)) is v for v in verbs); "
            "assert 'torch' not in sys.modules, 'torch imported by the verbs'; "
            "print(sorted(inspect.signature(kc.train).parameters)[:3])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "batch_size" in proc.stdout


def test_every_cli_verb_is_an_api_function_with_its_own_docstring():
    import inspect
    import pickle
    import pydoc

    from kagglecmr import api
    from kagglecmr.cli import app

    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    verbs = {v for v in api.__all__ if v[0].islower()}
    assert {c.replace("-", "_") for c in commands} <= verbs, "a CLI command without an API function"
    for verb in verbs:
        fn = getattr(kc, verb)
        assert fn is getattr(api, verb) and inspect.isfunction(fn) and fn.__module__ == "kagglecmr.api"
        assert pickle.loads(pickle.dumps(fn)) is fn
        shown = pydoc.render_doc(fn, renderer=pydoc.plaintext)  # what help(kc.<verb>) prints
        assert f"{verb}(" in shown and fn.__doc__ and fn.__doc__.splitlines()[0].strip() in shown
    # no module shares its name with a verb
    import pkgutil

    import kagglecmr

    modules = {m.name.rsplit(".", 1)[-1] for m in pkgutil.walk_packages(kagglecmr.__path__, "kagglecmr.")}
    assert not modules & verbs, modules & verbs


def test_train_is_submittable_to_a_process_pool():
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1) as pool, pytest.raises(KaggleCMRError):  # kc.make_folds pickled by reference
        pool.submit(kc.make_folds, "/nonexistent-data-folder", out="/nonexistent/folds.csv").result(timeout=120)


def test_api_ensemble_and_score_equal_the_cli(project, tmp_path, main_cli):
    args = ["--runs", project.run, "--data", project.data, "--split", "oof", "--tta-flips", "none,hflip",
            "--postprocess", "none", "--device", "cpu"]
    proc = main_cli("ensemble", *args, "--out", tmp_path / "cli.csv")
    assert proc.returncode == 0, proc.stderr
    res = kc.ensemble(project.run, data=project.data, split="oof", tta_flips=["none", "hflip"], postprocess="none",
                      device="cpu", out=tmp_path / "api.csv")
    assert res.out == tmp_path / "api.csv"
    assert (tmp_path / "api.csv").read_bytes() == (tmp_path / "cli.csv").read_bytes()
    assert res.probs.dtype == np.float32 and res.probs.shape == (25, 4, 96, 96)
    np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(res.labels, res.probs.argmax(1)) and res.tta == ["none", "hflip"] and res.plan is None
    assert res.rows == 75 and len(res.ids) == 25

    proc = main_cli("score", tmp_path / "cli.csv", "--data", project.data, "--json")
    assert proc.returncode == 0, proc.stderr
    cli_score = json.loads(proc.stdout)
    api_score = kc.score(tmp_path / "api.csv", data=project.data)
    assert api_score.to_dict() == cli_score
    assert res.score == pytest.approx(api_score.score, abs=1e-12)
    assert res.per_class == pytest.approx(api_score.per_class, abs=1e-12)


def _metrics_without_times(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    return df.drop(columns=[c for c in df.columns if c.endswith("_s")])


def test_api_train_equals_cli_and_no_ansi_off_a_terminal(project, tmp_path, cli):
    common = dict(config=project.config, data=project.data, folds=project.folds, epochs=1, device="cpu")
    proc = cli("train", "--fold", "0", "--config", common["config"], "--data", common["data"], "--folds",
               common["folds"], "--epochs", "1", "--device", "cpu", "--runs-dir", tmp_path / "cli")
    assert proc.returncode == 0, proc.stderr
    assert ANSI not in proc.stdout + proc.stderr  # no --quiet: the progress output is plain in a pipe
    assert "epoch 1/1" in proc.stdout
    res = kc.train(0, runs_dir=tmp_path / "api", **common)
    assert res.run_dir == tmp_path / "api" / "tiny" and res.oof is None and res.score is None
    (fold,) = res.folds
    summary = json.loads((res.run_dir / "fold0" / "summary.json").read_text())
    assert fold.best_score == pytest.approx(summary["best_score"]) and fold.best_epoch == 1
    pd.testing.assert_frame_equal(_metrics_without_times(tmp_path / "cli" / "tiny" / "fold0" / "metrics.csv"),
                                  _metrics_without_times(res.run_dir / "fold0" / "metrics.csv"))
    from safetensors.numpy import load_file

    a, b = load_file(tmp_path / "cli/tiny/fold0/best.safetensors"), load_file(res.run_dir / "fold0/best.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_reporter_is_plain_when_stdout_is_not_a_terminal(capsys):
    from kagglecmr.utils.progress import Reporter

    rep = Reporter("fold0", 2, quiet=False)
    assert not rep.live  # pytest's captured stdout is not a TTY, like Jupyter or a log file
    rep.epoch({"epoch": 1, "train_loss": 0.5, "val_dice": 0.7, "dice_1": 0.7, "best": True, "time_s": 1.0})
    rep.close()
    out = capsys.readouterr().out
    assert out == "fold0 epoch 1/2 loss 0.5000 val 0.7000 [1:0.700] * (1.0s)\n"


def test_api_errors_are_the_cli_errors(project, tmp_path):
    with pytest.raises(KaggleCMRError, match="run folder not found"):
        kc.ensemble(tmp_path / "nope", data=project.data, split="oof")
    with pytest.raises(ConfigError, match="train.epochs"):
        kc.train(0, config={"train": {"epochs": 0}}, data=project.data, folds=project.folds, runs_dir=tmp_path)
    with pytest.raises(KaggleCMRError, match="--split"):
        kc.ensemble(project.run, split="bogus")
    assert not any(tmp_path.iterdir())


def test_notebook_example_runs_and_its_submission_equals_ensemble(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("KAGGLECMR_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("KAGGLECMR_EPOCHS", "1")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "notebook.py"), run_name="__main__")
    work = tmp_path / "work"
    assert (work / "runs" / "notebook" / "oof.json").is_file()
    res = kc.ensemble(work / "runs" / "notebook", data=work / "data", split="test", tta=True, postprocess="none",
                      device="cpu", out=tmp_path / "ensemble.csv")
    assert (work / "submission.csv").read_bytes() == res.out.read_bytes()
    assert len(os.listdir(work / "data" / "test" / "image")) == 6


def test_every_listed_verb_is_the_api_function():
    """``kc.<verb>`` for every name in ``kagglecmr.__all__`` resolves to :mod:`kagglecmr.api`'s function."""
    from kagglecmr import api

    for name in kc._API:
        verb = getattr(kc, name)
        target = getattr(api, name)
        assert verb is target or (callable(verb) and verb._verb() is target), name
    assert "pseudo_label" in kc.__all__
