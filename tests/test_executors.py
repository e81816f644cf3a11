"""Where folds run: ``--jobs`` device assignment (GPU count mocked), Ray task resources, and
``train --executor ray`` on a local 2-CPU Ray: same folders, metrics, weights and OOF as ``local``,
resumable, locked folds skipped, task errors as one line naming the fold, a missing extra explained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RUN_NAME

from kagglecmr.cfg.config import load_config
from kagglecmr.engine import executors, orchestrate
from kagglecmr.engine.executors import assign_devices, task_resources
from kagglecmr.engine.orchestrate import run_train
from kagglecmr.engine.trainer import TIME_COLUMNS
from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.locks import FoldLock


# ------------------------------------------------------------------------------------ --jobs devices
@pytest.mark.parametrize(("device", "n_gpus", "expected"), [
    ("auto", 2, ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]),
    ("cuda", 3, ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]),
    (None, 4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]),
    ("auto", 1, ["cuda"] * 5),
    ("auto", 0, ["cpu"] * 5),
    ("cuda:1", 4, ["cuda:1"] * 5),  # an explicit GPU is respected
    ("cpu", 4, ["cpu"] * 5),
])
def test_assign_devices_round_robin(device, n_gpus, expected):
    assert assign_devices([0, 1, 2, 3, 4], device, n_gpus) == expected


def test_jobs_children_get_round_robin_gpus(project, tmp_path, monkeypatch, capsys):
    """``--jobs 2`` on 2 (mocked) GPUs: each child process trains its share of the folds (one warm-up
    each) and is told its GPU."""
    launched = []

    class FakeChild:
        returncode = 0

        def __init__(self, cmd, env):
            launched.append((cmd, env))

        def poll(self):
            return 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    from kagglecmr.engine.orchestrate import _train_parallel

    results = _train_parallel(load_config(project.config), [0, 1, 2], 2, data_root=project.data,
                              folds_path=project.folds, run_dir=tmp_path / RUN_NAME, device="auto", force=False)
    devices = [cmd[cmd.index("--device") + 1] for cmd, _ in launched]
    folds = [cmd[cmd.index("--fold") + 1] for cmd, _ in launched]
    assert folds == ["0,2", "1"] and devices == ["cuda:0", "cuda:1"]
    assert all(env["KAGGLECMR_SKIP_LOCKED"] == "1" for _, env in launched)
    assert "folds 0,2 -> cuda:0, folds 1 -> cuda:1" in capsys.readouterr().out
    assert all(r.skipped for r in results)  # the fake children wrote nothing


def test_jobs_child_failing_midway_names_only_the_folds_it_did_not_finish(project, tmp_path, monkeypatch):
    """A ``--jobs`` child stops at its first failing fold: the error names that fold and the ones after
    it, and says which of the same child's folds did finish (they are kept; a rerun resumes the rest)."""
    import json

    from kagglecmr.engine.orchestrate import _train_parallel
    from kagglecmr.utils.errors import KaggleCMRError

    run_dir = tmp_path / RUN_NAME

    class FakeChild:
        def __init__(self, cmd, env):
            folds = cmd[cmd.index("--fold") + 1].split(",")
            crashes = folds[0] == "0"  # child "0,2,4": fold 0 ends, fold 2 crashes; child "1,3" ends both
            for k in folds[:1] if crashes else folds:
                (run_dir / f"fold{k}").mkdir(parents=True, exist_ok=True)
                (run_dir / f"fold{k}" / "summary.json").write_text(json.dumps({"best_score": 0.5, "best_epoch": 1}))
            self.returncode = 2 if crashes else 0

        def poll(self):
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    with pytest.raises(KaggleCMRError) as err:
        _train_parallel(load_config(project.config), [0, 1, 2, 3, 4], 2, data_root=project.data,
                        folds_path=project.folds, run_dir=run_dir, device="cpu", force=False)
    assert str(err.value) == (f"{run_dir}: fold(s) 2, 4 did not finish (see the output above); fold(s) 0 of the "
                              "same child finished; rerun the command to resume them")


@pytest.mark.parametrize("stop", [KeyboardInterrupt, orchestrate.Terminated])
def test_stopped_parent_stops_its_jobs_children(project, tmp_path, monkeypatch, capsys, stop):
    """Ctrl-C or SIGTERM in the parent: its children get SIGTERM, are waited for (SIGKILL after the grace
    period), then the interruption goes on."""
    children = []

    class FakeChild:
        def __init__(self, cmd, env):
            self.signals, self.returncode, self.stubborn = [], None, not children
            children.append(self)

        def poll(self):
            return self.returncode

        def terminate(self):
            self.signals.append("TERM")
            if not self.stubborn:
                self.returncode = -15

        def kill(self):
            self.signals.append("KILL")
            self.returncode = -9

        def wait(self, timeout=None):
            if self.returncode is None:
                raise subprocess.TimeoutExpired("train", timeout)
            return self.returncode

    def sleep(_):
        raise stop

    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    monkeypatch.setattr(orchestrate.time, "sleep", sleep)
    monkeypatch.setattr(orchestrate, "STOP_GRACE_S", 0.1)
    with pytest.raises(stop):
        orchestrate._train_parallel(load_config(project.config), [0, 1, 2], 2, data_root=project.data,
                                    folds_path=project.folds, run_dir=tmp_path / RUN_NAME, device="cpu", force=False)
    assert [c.signals for c in children] == [["TERM", "KILL"], ["TERM"]]
    assert "stopping 2 training process(es)" in capsys.readouterr().out


@pytest.mark.parametrize(("device", "folds", "jobs", "cpus", "gpus", "expected"), [
    ("cpu", 2, 1, 2, 0, {"num_gpus": 0, "num_cpus": 1, "threads": 1, "at_once": 2}),
    ("cpu", 5, 1, 16, 0, {"num_gpus": 0, "num_cpus": 3, "threads": 3, "at_once": 5}),
    ("cpu", 5, 2, 16, 0, {"num_gpus": 0, "num_cpus": 8, "threads": 8, "at_once": 2}),
    ("cpu", 1, 1, 8, 0, {"num_gpus": 0, "num_cpus": 8, "threads": 8, "at_once": 1}),
    ("cuda", 5, 1, 16, 4, {"num_gpus": 1.0, "num_cpus": 1, "threads": 4, "at_once": 4}),
    ("cuda", 5, 5, 16, 1, {"num_gpus": 0.2, "num_cpus": 1, "threads": 3, "at_once": 5}),
    # 3 jobs on 2 GPUs: 2/3 of a GPU fits once per GPU (2 at once, not 3); half a GPU fits twice
    ("cuda", 5, 3, 16, 2, {"num_gpus": 0.5, "num_cpus": 1, "threads": 4, "at_once": 4}),
    ("cuda", 2, 3, 16, 2, {"num_gpus": 0.5, "num_cpus": 1, "threads": 8, "at_once": 2}),
    ("cuda", 5, 4, 12, 3, {"num_gpus": 0.5, "num_cpus": 1, "threads": 2, "at_once": 5}),
])
def test_task_resources(device, folds, jobs, cpus, gpus, expected):
    assert task_resources(device, folds, jobs, cpus, gpus) == expected


def _fits(share: float, gpus: int) -> int:
    """How many tasks asking ``share`` of a GPU Ray places on ``gpus`` whole GPUs (it counts in 1e-4)."""
    return gpus * (10_000 // round(share * 10_000))


@pytest.mark.parametrize("gpus", [1, 2, 3, 4])
@pytest.mark.parametrize("jobs", [1, 2, 3, 5, 7, 8])
def test_gpu_share_packs_and_threads_fit_what_runs_at_once(jobs, gpus):
    folds, cpus = 10, 32
    r = task_resources("cuda", folds, jobs, cpus, gpus)
    assert r["at_once"] == min(folds, _fits(r["num_gpus"], gpus))  # what the placement really runs at once
    assert r["at_once"] >= min(folds, max(jobs, gpus))  # at least --jobs (or one per GPU) at once
    assert r["threads"] * r["at_once"] <= cpus


# ------------------------------------------------------------------------------------ Ray
def test_ray_missing_is_a_one_line_install_hint(project, tmp_path, monkeypatch, main_cli, assert_cli_error):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    proc = main_cli("train", "--fold", "0", "--config", project.config, "--data", project.data, "--folds",
                    project.folds, "--runs-dir", tmp_path / "runs", "--executor", "ray")
    assert_cli_error(proc, "--executor ray", "pip install 'kagglecmr[ray]'")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("args", "needle"), [(["--executor", "dask"], "expected local or ray"),
                                              (["--ray-address", "auto"], "needs --executor ray")])
def test_executor_option_errors(project, tmp_path, main_cli, assert_cli_error, args, needle):
    proc = main_cli("train", "--fold", "0", "--config", project.config, "--data", project.data, "--folds",
                    project.folds, "--runs-dir", tmp_path / "runs", *args)
    assert_cli_error(proc, needle)


def _metrics(path: Path) -> list[list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    keep = [i for i, c in enumerate(rows[0]) if c not in TIME_COLUMNS]
    return [[r[i] for i in keep] for r in rows]


def test_ray_executor_equals_local_is_resumable_and_skips_locked_folds(project, tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    from safetensors.torch import load_file

    from kagglecmr.data.folds import run_make_folds

    folds2 = tmp_path / "folds2.csv"  # two folds: oof.json after two tasks
    run_make_folds(project.data, n_folds=2, seed=42, out=folds2)
    cfg = load_config(project.config)

    def train(runs: Path, executor: str, cfg=cfg):
        return run_train(cfg, fold_spec="0..1", data_root=project.data, folds_path=folds2, name=None, runs_dir=runs,
                         device="cpu", force=False, quiet=True, executor=executor)

    # Ray started here with 2 CPUs: two tasks at once, one thread each; local with one thread
    monkeypatch.setattr(executors, "cpu_count", lambda: 2)
    res_ray = train(tmp_path / "ray", "ray")
    assert not ray.is_initialized()  # started and stopped by run_train
    out = capsys.readouterr().out
    assert "ray: 2 CPUs" in out and "1 thread(s)" in out
    res_local = train(tmp_path / "local", "local", cfg=load_config(project.config, ["train.threads=1"]))

    a, b = tmp_path / "ray" / RUN_NAME, tmp_path / "local" / RUN_NAME
    assert [r.best_score for r in res_ray] == [r.best_score for r in res_local]
    for k in (0, 1):
        assert _metrics(a / f"fold{k}" / "metrics.csv") == _metrics(b / f"fold{k}" / "metrics.csv")
        ta, tb = load_file(a / f"fold{k}" / "best.safetensors"), load_file(b / f"fold{k}" / "best.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)
        with np.load(a / f"fold{k}" / "oof.npz") as za, np.load(b / f"fold{k}" / "oof.npz") as zb:
            assert np.array_equal(za["labels"], zb["labels"]) and list(za["ids"]) == list(zb["ids"])
        assert not (a / f"fold{k}" / "train.lock").exists()
        env_a, env_b = (json.loads((d / f"fold{k}" / "env.json").read_text()) for d in (a, b))
        assert env_a["folds_sha256"] == env_b["folds_sha256"] and env_a["folds"] == env_b["folds"] == str(folds2)
    assert json.loads((a / "oof.json").read_text()) == json.loads((b / "oof.json").read_text())
    assert sorted(p.name for p in (a / "fold0").iterdir()) == sorted(p.name for p in (b / "fold0").iterdir())

    # rerun on a Ray we started: a finished fold is skipped, a locked one too; a failing task is one line
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        metrics0 = (a / "fold0" / "metrics.csv").read_bytes()
        with FoldLock(a / "fold1"):
            res = train(tmp_path / "ray", "ray")
        out = capsys.readouterr().out
        assert [r.skipped for r in res] == [True, True] and res[1].locked_by and not res[0].locked_by
        assert "already finished" in out and "fold 1: skipped" in out
        assert (a / "fold0" / "metrics.csv").read_bytes() == metrics0

        (a / "fold1" / "summary.json").unlink()
        with pytest.raises(KaggleCMRError) as info:
            train(tmp_path / "ray", "ray", cfg=load_config(project.config, ["train.lr=0.01"]))
        msg = str(info.value)
        assert "\n" not in msg and "fold 1" in msg and "another config" in msg and "fold 0" in msg
        assert ray.is_initialized()  # not ours to stop
    finally:
        ray.shutdown()


def test_pseudo_with_ray_is_refused_before_anything_is_written(project, tmp_path):
    pytest.importorskip("ray")
    cfg = load_config(project.config, [f"train.pseudo.dir={tmp_path / 'pseudo'}"])
    with pytest.raises(KaggleCMRError, match="not supported with --executor ray"):
        run_train(cfg, fold_spec="0", data_root=project.data, folds_path=project.folds, name=None,
                  runs_dir=tmp_path / "runs", device="cpu", force=False, quiet=True, executor="ray")
    assert not (tmp_path / "runs").exists()  # no run.json
