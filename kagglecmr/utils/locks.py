"""The fold lock: one trainer per fold folder at a time.

While a process trains a fold it holds ``<fold folder>/train.lock``, a small JSON file with its pid,
host and start time, created atomically (``O_CREAT | O_EXCL``: of two processes racing for a fold,
exactly one creates the file).  Another trainer of the same fold is refused with a
:class:`FoldLocked` error naming the folder and the holder (``--jobs`` and Ray skip the fold instead).

A lock whose pid is gone on this host (kill -9, a crash of the machine's process) is stale and is
taken over; so is one whose pid now belongs to another process (pid reuse: the process start time
differs).  A lock written on another host is always respected: this host cannot tell whether its
process still runs, so the message says how to remove it.  The lock is released on normal exit and
on exceptions (a ``with`` block).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from kagglecmr.utils.errors import KaggleCMRError

LOCK_NAME = "train.lock"
_PARTIAL_GRACE_S = 10.0  # a lock file caught between creation and write is "being created" this long


class FoldLocked(KaggleCMRError):
    """Another live trainer holds the fold folder's lock."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
    return fields[19] if len(fields) > 19 else None


def _pid_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[0]


def pid_alive(pid: int, proc_start: str | None = None) -> bool:
    """Whether ``pid`` runs on this host (and, when ``proc_start`` is known, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if _pid_state(pid) == "Z":  # exited, not yet reaped by its parent
        return False
    if proc_start is not None:
        now = _proc_start(pid)
        if now is not None and now != proc_start:
            return False  # the pid was reused by another process
    return True


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"


class FoldLock:
    """``with FoldLock(fold_folder): ...`` holds ``fold_folder/train.lock`` for the block.

    Raises :class:`FoldLocked` when a live trainer holds it; takes over a stale lock (dead pid on
    this host).  The folder is created if needed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.host = socket.gethostname()
        self.record: dict | None = None

    # ------------------------------------------------------------------------------- acquire
    def acquire(self) -> FoldLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": self.host, "proc_start": _proc_start(os.getpid()),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        text = json.dumps(record, sort_keys=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                seen = self._read()
                if seen is None:
                    continue  # released (or taken over) meanwhile: try again
                holder, raw = seen
                if holder is None:  # being written by its creator, or left half-written by a crash
                    if time.time() - self._mtime() < _PARTIAL_GRACE_S:
                        time.sleep(0.05)
                        continue
                    self._take_over(raw)
                    continue
                if self._is_stale(holder):
                    print(f"{self.folder}: taking over the stale lock of {_describe(holder)} (that process is gone)",
                          flush=True)
                    self._take_over(raw)
                    continue
                raise FoldLocked(self._held_message(holder), holder) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            self.record = record
            return self
        raise KaggleCMRError(f"{self.path}: could not take the fold lock (it keeps changing hands)")

    def _read(self) -> tuple[dict | None, str] | None:
        """``(holder or None when unparsable, raw text)``, or None when the file is gone."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            raw = ""
        try:
            holder = json.loads(raw)
            return (holder if isinstance(holder, dict) and "pid" in holder else None), raw
        except ValueError:
            return None, raw

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") != self.host:
            return False  # another machine's process: cannot be checked from here
        try:
            pid = int(holder["pid"])
        except (TypeError, ValueError):
            return True
        return not pid_alive(pid, holder.get("proc_start"))

    def _take_over(self, raw: str) -> None:
        """Remove the stale lock we read, but never a fresh one that replaced it meanwhile: move it
        aside (atomic), check it is the file we judged stale, else put it back."""
        aside = self.path.with_name(f".{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_text() != raw:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                aside.unlink()

    def _held_message(self, holder: dict) -> str:
        who = _describe(holder)
        if holder.get("host") != self.host:
            return (f"{self.folder}: locked by {who}; another machine's trainer may still run it "
                    f"(if not, remove {self.path})")
        return f"{self.folder}: another trainer is running this fold ({who}); wait for it or stop it"

    # ------------------------------------------------------------------------------- release
    def release(self) -> None:
        """Remove the lock file if it is still ours (never another process's lock)."""
        if self.record is None:
            return
        seen = self._read()
        if seen is not None and seen[0] is not None and seen[0].get("pid") == self.record["pid"] \
                and seen[0].get("host") == self.host and seen[0].get("started") == self.record["started"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.record = None

    def __enter__(self) -> FoldLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
