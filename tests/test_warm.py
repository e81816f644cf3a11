"""One warm-up per process (issue 15): folds trained one after another reuse the model, optimiser and
training step in place, and what they train is exactly what a fresh build per fold trains (CPU)."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from conftest import RUN_NAME
from test_train import assert_same_tensors, read_metrics, train_lib, without_time

from kagglecmr.cfg.config import load_config
from kagglecmr.engine import warm
from kagglecmr.engine.orchestrate import chunk_folds
from kagglecmr.models.factory import build_model
from kagglecmr.utils.runtime import seed_everything

# EMA and SWA on, so their in-place reset is checked too; select swa reads the SWA copy.
OVERRIDES = ["train.epochs=2", "train.ema=0.5", "train.swa_epochs=1", "train.threads=1"]


def _fold(runs, k):
    return runs / RUN_NAME / f"fold{k}"


def test_warm_folds_equal_fresh_builds(project, tmp_path, monkeypatch):
    """Folds 0..2 in one process (the 2nd and 3rd reuse the 1st's state) == each fold on a fresh build."""
    warm.clear()
    train_lib(project, tmp_path / "warm", fold="0..2", overrides=OVERRIDES)
    monkeypatch.setenv(warm.WARM_ENV, "0")
    for k in range(3):
        warm.clear()
        train_lib(project, tmp_path / "cold", fold=str(k), overrides=OVERRIDES)
    for k in range(3):
        a, b = _fold(tmp_path / "warm", k), _fold(tmp_path / "cold", k)
        assert json.loads((a / "env.json").read_text())["warm_start"] is (k > 0)
        assert json.loads((b / "env.json").read_text())["warm_start"] is False
        assert without_time(read_metrics(a / "metrics.csv")) == without_time(read_metrics(b / "metrics.csv"))
        for name in ("best.safetensors", "last.safetensors", "swa.safetensors"):
            assert_same_tensors(a / name, b / name)
    # ... and the comparison can fail: the folds themselves differ from one another
    assert (without_time(read_metrics(_fold(tmp_path / "warm", 0) / "metrics.csv"))
            != without_time(read_metrics(_fold(tmp_path / "warm", 1) / "metrics.csv")))


class Stop(Exception):
    pass


def test_resumed_fold_after_a_warm_one_equals_an_uninterrupted_run(project, tmp_path, monkeypatch):
    """A fold that resumes from last.pt in a process whose kept state trained another fold first."""
    import kagglecmr.engine.trainer as train_module

    warm.clear()
    train_lib(project, tmp_path / "ref", fold="1", overrides=OVERRIDES)
    runs = tmp_path / "resumed"
    real = train_module.write_metrics

    def stop_after_first_epoch(path, history):
        real(path, history)
        if len(history) == 1:
            raise Stop

    monkeypatch.setattr(train_module, "write_metrics", stop_after_first_epoch)
    with pytest.raises(Stop):
        train_lib(project, runs, fold="1", overrides=OVERRIDES)
    monkeypatch.undo()
    assert not (_fold(runs, 1) / "summary.json").exists() and (_fold(runs, 1) / "last.pt").is_file()
    train_lib(project, runs, fold="0..1", overrides=OVERRIDES)  # fold 0 first, then its kept state resumes fold 1
    a, b = _fold(tmp_path / "ref", 1), _fold(runs, 1)
    assert json.loads((b / "env.json").read_text())["warm_start"] is True
    assert without_time(read_metrics(a / "metrics.csv")) == without_time(read_metrics(b / "metrics.csv"))
    for name in ("best.safetensors", "last.safetensors", "swa.safetensors"):
        assert_same_tensors(a / name, b / name)


def test_state_is_kept_per_key(project):
    cfg = load_config(project.config)
    cfg.data.in_channels, cfg.data.num_classes = 1, 4
    dev = torch.device("cpu")
    warm.clear()
    seed_everything(1, 0)
    a, reused = warm.step_state(cfg, build_model(cfg), dev, None, False, 8, 0)
    assert not reused
    seed_everything(1, 1)
    fresh = build_model(cfg)
    b, reused = warm.step_state(cfg, fresh, dev, None, False, 8, 0)
    assert reused and b is a and b.model is not fresh  # same tensors, the fresh weights copied in
    for (n, p), q in zip(b.model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), n
    c, reused = warm.step_state(cfg, build_model(cfg), dev, None, False, 6, 0)  # another batch shape
    assert not reused and c is not a
    other = cfg.model_copy(deep=True)
    other.seed, other.train.epochs = 7, 99  # seeds and epochs do not change the state
    assert warm.state_key(other, dev, None, False, 6, 0) == warm.state_key(cfg, dev, None, False, 6, 0)
    other.train.lr = 0.5
    assert warm.state_key(other, dev, None, False, 6, 0) != warm.state_key(cfg, dev, None, False, 6, 0)
    warm.clear()


@pytest.mark.parametrize("folds, jobs, expected", [
    ([0, 1, 2, 3, 4], 2, [[0, 2, 4], [1, 3]]),
    ([0, 1, 2, 3, 4], 5, [[0], [1], [2], [3], [4]]),
    ([0, 1, 2, 3, 4], 8, [[0], [1], [2], [3], [4]]),
    ([1, 3], 3, [[1], [3]]),
])
def test_jobs_give_each_process_a_share_of_the_folds(folds, jobs, expected):
    assert chunk_folds(folds, jobs) == expected


# ------------------------------------------------------------------------------------ freed when the run ends
FAST = ["train.epochs=1", "train.threads=1"]


@pytest.fixture
def kept_states(monkeypatch):
    """Weak references to every step state training builds or reuses, and whether it was reused."""
    import kagglecmr.engine.trainer as train_module

    seen, real = [], train_module.step_state

    def spy(*args, **kwargs):
        st, reused = real(*args, **kwargs)
        seen.append((weakref.ref(st), weakref.ref(st.model), reused))
        return st, reused

    monkeypatch.setattr(train_module, "step_state", spy)
    return seen


def _all_dead(seen) -> bool:
    gc.collect()
    return all(ref() is None for st, model, _ in seen for ref in (st, model))


def test_warm_state_is_reused_within_a_run_and_freed_when_it_returns(project, tmp_path, kept_states):
    warm.clear()
    train_lib(project, tmp_path / "runs", fold="0..1", overrides=FAST)
    assert [reused for *_, reused in kept_states] == [False, True]  # one warm-up for the run's folds
    assert not warm._CACHE and _all_dead(kept_states)  # no model left in memory after kc.train(...)


def test_warm_state_is_kept_across_seeds_of_one_run(project, tmp_path, kept_states):
    from kagglecmr.engine.orchestrate import run_train

    warm.clear()
    run_train(load_config(project.config, FAST), fold_spec="0", data_root=project.data, folds_path=project.folds,
              name=None, runs_dir=tmp_path, device="cpu", force=False, quiet=True, seeds="1,2")
    assert [reused for *_, reused in kept_states] == [False, True]
    assert json.loads((tmp_path / f"{RUN_NAME}-s2" / "fold0" / "env.json").read_text())["warm_start"] is True
    assert not warm._CACHE and _all_dead(kept_states)


def test_warm_state_is_freed_when_the_run_raises(project, tmp_path, kept_states, monkeypatch):
    """Even while the exception (and its traceback) is kept, as a notebook keeps the last error."""
    import kagglecmr.engine.trainer as train_module

    real = train_module.write_metrics

    def fail_in_second_fold(path, history):
        real(path, history)
        if path.parent.name == "fold1":
            raise Stop

    monkeypatch.setattr(train_module, "write_metrics", fail_in_second_fold)
    warm.clear()
    with pytest.raises(Stop) as info:
        train_lib(project, tmp_path / "runs", fold="0..1", overrides=FAST)
    assert info.value.__traceback__ is not None
    assert [reused for *_, reused in kept_states] == [False, True]
    assert not warm._CACHE and _all_dead(kept_states)
