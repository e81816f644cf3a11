"""Atomic file writing: write to a temporary file in the same folder, then rename over the target.

A crash (or kill -9) mid-write never leaves a truncated file behind, and a failed write never
destroys the previous version of the file.  The data is flushed to disk (``fsync``) before the rename
and the folder after it, so a power cut neither leaves an empty file under the new name.  Files get
the user's umask like any other new file (0644 under umask 022), not the 0600 of a private temp file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from kagglecmr.utils.errors import KaggleCMRError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.  With
    ``overwrite=False`` an existing ``path`` raises :class:`KaggleCMRError` before anything is
    written.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise KaggleCMRError(f"{path}: already exists (use --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_temp(path)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent, best_effort=True)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _new_temp(path: Path) -> Path:
    """An empty new file beside ``path`` (the temp name ends in ``path``'s suffix), created with mode
    0666 so the kernel applies the umask (and a default ACL) as for any other file."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise KaggleCMRError(f"{path.parent}: cannot create a temporary file for {path.name}")


def _fsync(path: Path, *, best_effort: bool = False) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not best_effort:
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, obj, *, overwrite: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", overwrite=overwrite)
