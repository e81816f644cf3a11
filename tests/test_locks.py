"""The fold lock: a kernel lock (flock) with the holder named in the file, refusal naming it, files left by
dead holders (kill -9) taken over, pickling, and what ``train`` does with a locked fold (exit 2 alone; skip
under ``--jobs``; children stopped with the parent)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RUN_NAME, copy_run, tree_snapshot

from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.locks import LOCK_NAME, FoldLock, FoldLocked

HOST = socket.gethostname()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": 1, "host": HOST, "started": "2026-01-01T00:00:00+00:00"} | fields
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return folder / LOCK_NAME


def train_args(project, runs_dir: Path, fold: str, *extra) -> list[str]:
    return ["train", "--fold", fold, "--config", project.config, "--data", project.data, "--folds", project.folds,
            "--runs-dir", runs_dir, "--quiet", *extra]


# ------------------------------------------------------------------------------------ the lock itself
def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    folder = tmp_path / "fold0"
    with FoldLock(folder) as lock:
        held = json.loads(lock.path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == HOST and held["started"]
        with pytest.raises(FoldLocked, match=f"pid {os.getpid()} on host {HOST}") as info:
            FoldLock(folder).acquire()
        assert str(folder) in str(info.value) and "\n" not in str(info.value)
    assert not (folder / LOCK_NAME).exists()

    with pytest.raises(RuntimeError), FoldLock(folder):  # released on exceptions too
        raise RuntimeError("boom")
    assert not (folder / LOCK_NAME).exists()


def test_release_never_removes_another_process_lock(tmp_path):
    folder = tmp_path / "fold0"
    lock = FoldLock(folder).acquire()
    (folder / LOCK_NAME).unlink()  # removed behind our back (by hand) and taken by another trainer
    other = FoldLock(folder).acquire()
    lock.release()
    assert json.loads((folder / LOCK_NAME).read_text())["started"] == other.record["started"]
    with pytest.raises(FoldLocked):  # still held by the other one
        FoldLock(folder).acquire()
    other.release()
    assert not (folder / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "fold0"
    pid = dead_pid()
    write_lock(folder, pid=pid)
    with FoldLock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {pid}" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == []  # nothing left aside


def test_a_live_pid_without_the_kernel_lock_does_not_hold_the_fold(tmp_path, capsys):
    """No pid guessing: a record naming a running process (pid reused, a file copied from elsewhere)
    holds nothing unless that process holds the kernel lock."""
    folder = tmp_path / "fold0"
    write_lock(folder, pid=os.getppid())
    with FoldLock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {os.getppid()}" in capsys.readouterr().out


def test_half_written_lock_file_is_taken_over_at_once(tmp_path, capsys):
    """A holder killed between creating the file and writing its record left a file nobody holds."""
    folder = tmp_path / "fold0"
    folder.mkdir()
    (folder / LOCK_NAME).write_text('{"pid": 12')
    t0 = time.monotonic()
    with FoldLock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert time.monotonic() - t0 < 0.5
    assert "half-written lock file" in capsys.readouterr().out


def test_holder_that_has_not_written_its_record_yet_is_refused(tmp_path):
    import fcntl

    folder = tmp_path / "fold0"
    folder.mkdir()
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held, still empty
        with pytest.raises(FoldLocked, match="another trainer is running this fold") as info:
            FoldLock(folder).acquire()
        assert "not recorded yet" in str(info.value) and info.value.holder == {}
    finally:
        os.close(fd)


def test_fold_locked_pickles_with_its_holder():
    holder = {"pid": 7, "host": "node-1", "started": "2026-01-01T00:00:00+00:00"}
    exc = pickle.loads(pickle.dumps(FoldLocked("runs/x/fold0: locked", holder)))
    assert isinstance(exc, FoldLocked) and str(exc) == "runs/x/fold0: locked" and exc.holder == holder


HOLD = ("import sys, time; from kagglecmr.utils.locks import FoldLock\n"
        "lock = FoldLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)\n")


def test_kill9_holder_does_not_block_the_next_trainer(tmp_path, capsys):
    folder = tmp_path / "fold0"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(FoldLocked, match=f"pid {proc.pid} on host {HOST}"):  # held by another process
            FoldLock(folder).acquire()
    finally:
        proc.kill()  # SIGKILL: no exit handler runs
        proc.wait(timeout=60)
        proc.stdout.close()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == proc.pid  # its file is left behind
    t0 = time.monotonic()
    with FoldLock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert time.monotonic() - t0 < 0.5
    assert f"taking over the stale lock of pid {proc.pid}" in capsys.readouterr().out
    assert not (folder / LOCK_NAME).exists()


def test_lock_from_another_host_is_respected(tmp_path):
    folder = tmp_path / "fold0"
    path = write_lock(folder, pid=dead_pid(), host="other-node-7")
    with pytest.raises(FoldLocked) as info:
        FoldLock(folder).acquire()
    msg = str(info.value)
    assert "other-node-7" in msg and f"remove {path}" in msg and isinstance(info.value, KaggleCMRError)
    assert json.loads(path.read_text())["host"] == "other-node-7"


def test_racing_processes_exactly_one_wins(tmp_path):
    folder = tmp_path / "fold0"
    folder.mkdir()
    code = ("import sys, time; from kagglecmr.utils.locks import FoldLock, FoldLocked\n"
            "time.sleep(max(0, float(sys.argv[2]) - time.time()))\n"
            "try:\n    lock = FoldLock(sys.argv[1]).acquire()\nexcept FoldLocked:\n    print('refused')\n"
            "else:\n    print('won'); time.sleep(1.5); lock.release()\n")
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", code, str(folder), str(start)], stdout=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
             for _ in range(4)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(outs) == ["refused", "refused", "refused", "won"], outs
    assert not (folder / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------ train with locks
def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def test_second_trainer_of_a_fold_is_refused_then_kill9_lock_is_taken_over(project, tmp_path, cli,
                                                                            assert_cli_error):
    runs = tmp_path / "runs"
    fold = runs / RUN_NAME / "fold0"
    first = subprocess.Popen([sys.executable, "-m", "kagglecmr", *map(str, train_args(project, runs, "0",
                                                                                       "--epochs", "200"))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(fold / "metrics.csv", first)  # past its lock and into training
        assert first.poll() is None, first.stderr.read().decode()
        second = cli(*train_args(project, runs, "0", "--epochs", "200"))
        assert_cli_error(second, str(fold), f"pid {first.pid} on host {HOST}", "another trainer")
        assert first.poll() is None  # the holder goes on
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        first.stderr.close()
    assert json.loads((fold / LOCK_NAME).read_text())["pid"] == first.pid  # kill -9 leaves the lock behind

    # (resuming after kill -9 through the stale lock: test_train's resume test; here a short retrain)
    again = cli(*train_args(project, runs, "0", "--epochs", "1", "--force"), timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"taking over the stale lock of pid {first.pid}" in again.stdout
    assert (fold / "summary.json").is_file() and not (fold / LOCK_NAME).exists()


def test_locked_fold_exits_2_alone_and_is_skipped_with_jobs(project, tmp_path, cli, main_cli, assert_cli_error):
    runs = tmp_path / "runs"
    copy_run(project.run, runs / RUN_NAME, slim=True)
    for k in (0, 1):  # unfinished: they would train
        for name in ("summary.json", "oof.npz"):
            (runs / RUN_NAME / f"fold{k}" / name).unlink()
    with FoldLock(runs / RUN_NAME / "fold1"):
        before = tree_snapshot(runs / RUN_NAME / "fold1")
        proc = main_cli(*train_args(project, runs, "1"))
        assert_cli_error(proc, "fold1", f"pid {os.getpid()}")

        proc = cli(*train_args(project, runs, "0..1", "--jobs", "2"), timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert "fold 1: skipped" in proc.stdout and f"pid {os.getpid()}" in proc.stdout
        assert (runs / RUN_NAME / "fold0" / "summary.json").is_file()
        assert tree_snapshot(runs / RUN_NAME / "fold1") == before  # untouched, our lock still there
        assert "out-of-fold Dice" not in proc.stdout  # fold 1 has no summary: no OOF over an unfinished fold


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def test_sigterm_to_train_jobs_stops_its_children_and_frees_their_locks(project, tmp_path):
    runs = tmp_path / "runs"
    folds = [runs / RUN_NAME / f"fold{k}" for k in (0, 1)]
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        parent = subprocess.Popen([sys.executable, "-m", "kagglecmr", *map(str, train_args(
            project, runs, "0..1", "--jobs", "2", "--epochs", "500"))], stdout=out, stderr=err)
    children = {}
    try:
        deadline = time.time() + 240
        while len(children) < 2 and parent.poll() is None and time.time() < deadline:  # both children training
            for fold in folds:
                with contextlib.suppress(OSError, ValueError):
                    children[fold] = json.loads((fold / LOCK_NAME).read_text())["pid"]
            time.sleep(0.05)
        assert len(children) == 2 and parent.pid not in children.values(), (tmp_path / "err.txt").read_text()
        assert all(_running(pid) for pid in children.values())
        t0 = time.monotonic()
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=60)
        stopped_s = time.monotonic() - t0
        while any(_running(pid) for pid in children.values()) and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert not any(_running(pid) for pid in children.values())
    finally:
        for pid in children.values():  # never leave a trainer behind
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    print(f"--jobs 2 stopped {stopped_s:.2f} s after SIGTERM")
    assert stopped_s < 15
    assert parent.returncode == 130  # stopped like Ctrl-C (Typer exits 130), not killed by the signal
    for fold in folds:
        assert not (fold / LOCK_NAME).exists()  # released by the children themselves
        with FoldLock(fold):  # and free
            pass
        assert (fold / "last.pt").is_file() or not (fold / "metrics.csv").exists()  # resumable where it trained
