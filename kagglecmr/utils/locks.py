"""The fold lock: one trainer per fold folder at a time.

While a process trains a fold it holds an exclusive kernel lock (``flock``) on ``<fold folder>/train.lock``
and writes its pid, host and start time into that file, for messages only.  Another trainer of the same
fold is refused with a :class:`FoldLocked` error naming the folder and the holder (``--jobs`` and Ray
skip the fold instead).

The kernel releases the lock when its process ends in any way (normal exit, exception, SIGTERM,
kill -9, a crash), so a lock never goes stale and no pid has to be guessed alive or dead: a lock file
a killed trainer left behind is simply locked by the next trainer, which says whose it was.  On normal
exit and on exceptions (a ``with`` block) the file is removed too.

Other hosts: on NFS (v4, or v3 with lockd) ``flock`` locks hold between machines, so a fold another
machine trains is refused like a local one.  Some network file systems keep locks per machine; so a
file left with another host's record while no lock is held is respected (that trainer died, or this
file system does not share locks between machines) and the message says how to remove it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from kagglecmr.utils.errors import KaggleCMRError

LOCK_NAME = "train.lock"
_RECORD_WAIT_S = 1.0  # how long a refused trainer waits for a new holder to write its record


class FoldLocked(KaggleCMRError):
    """Another live trainer holds the fold folder's lock (``holder``: its pid/host/started, if known)."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = dict(holder or {})

    def __reduce__(self):  # pickles with its holder (Ray, multiprocessing)
        return type(self), (str(self), self.holder)


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"


def _parse(raw: str) -> dict | None:
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


class FoldLock:
    """``with FoldLock(fold_folder): ...`` holds the kernel lock on ``fold_folder/train.lock`` for the block.

    Raises :class:`FoldLocked` when another trainer holds it.  The folder is created if needed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.host = socket.gethostname()
        self.record: dict | None = None
        self._fd: int | None = None

    # ------------------------------------------------------------------------------- acquire
    def acquire(self) -> FoldLock:
        if self._fd is not None:
            raise KaggleCMRError(f"{self.path}: this lock is already held by this FoldLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            ours = False
            try:
                ours = self._lock(fd)
            finally:
                if not ours:
                    os.close(fd)  # also releases a lock taken on a file that turned out stale or another host's
            if ours:
                return self
        raise KaggleCMRError(f"{self.path}: could not take the fold lock (it keeps changing hands)")

    def _lock(self, fd: int) -> bool:
        """Lock ``fd``; True when it is now ours, False when the file was removed meanwhile (try again)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._wait_for_record(fd)
            raise FoldLocked(self._held_message(holder), holder) from None
        except OSError as exc:
            raise KaggleCMRError(f"{self.path}: cannot lock the fold ({exc.strerror}); the file system of "
                                 f"{self.folder} does not support file locks") from None
        if not self._is_current(fd):  # its holder released and removed it between our open and flock
            return False
        raw = _read(fd)
        left = _parse(raw)
        if left is not None and left.get("host") != self.host:
            raise FoldLocked(self._left_message(left), left)
        if left is not None:
            print(f"{self.folder}: taking over the stale lock of {_describe(left)} (that process is gone)", flush=True)
        elif raw.strip():
            print(f"{self.folder}: taking over a half-written lock file (its writer is gone)", flush=True)
        record = {"pid": os.getpid(), "host": self.host,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record, sort_keys=True).encode(), 0)
        self._fd, self.record = fd, record
        return True

    def _is_current(self, fd: int) -> bool:
        """Whether ``fd`` is still the file at ``self.path`` (not one removed and replaced since)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _wait_for_record(self, fd: int) -> dict:
        """The holder's record; a holder that has just taken the lock may not have written it yet."""
        deadline = time.monotonic() + _RECORD_WAIT_S
        while True:
            holder = _parse(_read(fd))
            if holder is not None:
                return holder
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.02)

    def _held_message(self, holder: dict) -> str:
        who = _describe(holder) if holder else "holder not recorded yet"
        if holder and holder.get("host") != self.host:
            return f"{self.folder}: a trainer on another machine is running this fold ({who}; it holds the lock)"
        return f"{self.folder}: another trainer is running this fold ({who}); wait for it or stop it"

    def _left_message(self, holder: dict) -> str:
        return (f"{self.folder}: locked by {_describe(holder)}; no lock is held on it from here, so that trainer "
                f"stopped or this file system does not share locks between machines (if it does not run, "
                f"remove {self.path})")

    # ------------------------------------------------------------------------------- release
    def release(self) -> None:
        """Remove the lock file if it is still ours, then release the kernel lock."""
        if self._fd is None:
            return
        fd, self._fd, self.record = self._fd, None, None
        try:
            if self._is_current(fd):  # while still locked: nobody else can have taken it
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the lock

    def __enter__(self) -> FoldLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    size = os.fstat(fd).st_size
    return os.pread(fd, max(size, 1), 0).decode("utf-8", errors="replace")
