"""Atomic writes (``kagglecmr.utils.io``): the user's umask, fsync before the rename, and a failed write
keeps the previous file."""

from __future__ import annotations

import os
import stat

import pytest

from kagglecmr.utils import io
from kagglecmr.utils.errors import KaggleCMRError


@pytest.fixture
def umask():
    """Set the process umask for a test, restored after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)], ids=["022", "027", "002"])
def test_written_files_get_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what any other file gets
    assert stat.S_IMODE(plain.stat().st_mode) == mode
    for target in (io.atomic_write_text(tmp_path / "a.json", "{}"), io.atomic_write_bytes(tmp_path / "b.bin", b"1")):
        assert stat.S_IMODE(target.stat().st_mode) == mode
    with io.atomic_path(tmp_path / "c.npz") as tmp, open(tmp, "wb") as fh:
        fh.write(b"data")
    assert stat.S_IMODE((tmp_path / "c.npz").stat().st_mode) == mode
    io.atomic_write_text(tmp_path / "a.json", "{}")  # replacing a file: the same
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "summary.json"
    io.atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), io.atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left


def test_no_overwrite_refuses_before_writing(tmp_path):
    path = tmp_path / "sub.csv"
    io.atomic_write_text(path, "old")
    with pytest.raises(KaggleCMRError, match="already exists"):
        io.atomic_write_text(path, "new", overwrite=False)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


def test_data_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    io.atomic_write_bytes(tmp_path / "w.bin", b"12345")
    assert events == [("fsync", 5), ("replace", "w.bin"), ("fsync", "dir")]
    assert (tmp_path / "w.bin").read_bytes() == b"12345"


def test_a_folder_that_cannot_be_fsynced_is_not_an_error(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")  # some file systems refuse fsync on folders
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert io.atomic_write_text(tmp_path / "x.txt", "x").read_text() == "x"
