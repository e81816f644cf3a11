"""Lazy rows: a read-only ``[N, ...]`` array whose rows stay in ``.npy`` files until a caller asks for them.

The decoded-array cache (:mod:`kagglecmr.data.cache`) keeps a split as ``images.npy`` / ``masks.npy``.  A
:class:`LazyRows` over them reads only the rows indexed, with plain file reads into a fresh array: nothing is
memory-mapped, so a row costs the process memory only while the caller holds it (a memory map would count
every page ever touched in the process's resident set until the kernel reclaims it), and the OS page cache
keeps a small dataset as fast as an in-memory one.

``rows[i]``, ``rows[a:b]``, ``rows[[i, j]]`` and ``rows[bool_mask]`` return ndarrays, as numpy indexing does
(other ndarray methods, ``rows.max()``..., read every row first);
:func:`take` and :func:`concat` (what ``Split.subset`` and ``loader.concat`` use) return lazy rows again (an
index into the files), and ``np.asarray(rows)`` reads everything.  Iterating yields one row at a time, read
in blocks of about :data:`BLOCK_BYTES`; :func:`blocks` yields ``(start, ndarray)`` blocks of any array, lazy or
not.  In-memory arrays pass through :func:`take` / :func:`concat` as numpy would (a copy), as before.  Pure
numpy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK_BYTES = 64 << 20  # rows read at once when iterating


@dataclass(frozen=True)
class NpyFile:
    """The layout of one C-ordered ``.npy`` file: where its data starts, its shape and dtype."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def open(cls, path) -> NpyFile:
        path = Path(path)
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            offset = fh.tell()
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}: expected a C-ordered array of plain values")
        return cls(path, offset, tuple(shape), dtype)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def _read_into(fh, offset: int, buf: memoryview) -> None:
    fh.seek(offset)
    done = 0
    while done < len(buf):
        n = fh.readinto(buf[done:])
        if not n:
            raise OSError(f"{fh.name}: file ended early (the cache entry is damaged: delete it)")
        done += n


class LazyRows:
    """Rows ``index[k] = (file number, row)`` of the :class:`NpyFile` s ``files`` (same row shape and dtype)."""

    def __init__(self, files: list[NpyFile], index: np.ndarray):
        self.files = list(files)
        self.index = np.asarray(index, np.int64).reshape(-1, 2)
        first = self.files[0]
        for f in self.files[1:]:
            if f.shape[1:] != first.shape[1:] or f.dtype != first.dtype:
                raise ValueError(f"{f.path}: rows {f.shape[1:]} {f.dtype}, {first.path} has {first.shape[1:]} {first.dtype}")
        self.dtype = first.dtype
        self.shape = (len(self.index), *first.shape[1:])

    @classmethod
    def of_file(cls, path) -> LazyRows:
        f = NpyFile.open(path)
        return cls([f], np.stack([np.zeros(f.shape[0], np.int64), np.arange(f.shape[0])], 1))

    # ------------------------------------------------------------------ what numpy code asks of an array
    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyRows(shape={self.shape}, dtype={self.dtype}, files={[str(f.path) for f in self.files]})"

    def __getattr__(self, name: str):
        """Any other ndarray attribute (``max``, ``mean``, ``astype``...) of all the rows, read for the call."""
        if name.startswith("_") or not hasattr(np.ndarray, name):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(np.asarray(self), name)

    def __array__(self, dtype=None, copy=None):
        out = self._read(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if not key or any(k is Ellipsis or k is None for k in key):  # rows[..., c]: all rows read, then indexed
                return np.asarray(self)[key]
            head = self[key[0]]
            return head[key[1:]] if np.ndim(key[0]) == 0 and not isinstance(key[0], slice) \
                else head[(slice(None), *key[1:])]
        if isinstance(key, (int, np.integer)):
            k = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= k < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows")
            return self._read(np.array([k]))[0]
        return self._read(np.arange(len(self))[key])

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, block in blocks(self):
            yield from block

    def take(self, idx) -> LazyRows:
        """The rows ``idx`` (ints or a boolean mask), still on disk."""
        return LazyRows(self.files, self.index[np.arange(len(self))[idx]])

    def _read(self, pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos, np.int64).reshape(-1)
        out = np.empty((len(pos), *self.shape[1:]), self.dtype)
        if not len(pos):
            return out
        fi, ri = self.index[pos, 0], self.index[pos, 1]
        brk = np.flatnonzero((np.diff(fi) != 0) | (np.diff(ri) != 1)) + 1  # runs of consecutive rows of one file
        starts, ends = np.r_[0, brk], np.r_[brk, len(pos)]
        flat = memoryview(out.reshape(-1).view(np.uint8))
        with ExitStack() as stack:  # each call opens its own handles: safe from threads, nothing to pickle
            handles = {}
            for s, e in zip(starts.tolist(), ends.tolist()):
                f = self.files[int(fi[s])]
                if int(fi[s]) not in handles:
                    handles[int(fi[s])] = stack.enter_context(open(f.path, "rb", buffering=0))
                rb = f.row_bytes
                _read_into(handles[int(fi[s])], f.offset + int(ri[s]) * rb, flat[s * rb:e * rb])
        return out


def _on_all_rows(name: str):
    def op(self, *args):
        return getattr(np.asarray(self), name)(*args)
    op.__name__ = name
    return op


# operators read every row, as the other ndarray methods do (``masks == k`` must not fall back to identity)
for _name in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__add__", "__radd__", "__sub__",
              "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__floordiv__", "__rfloordiv__",
              "__mod__", "__pow__", "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__lshift__",
              "__rshift__", "__neg__", "__pos__", "__abs__", "__invert__"):
    setattr(LazyRows, _name, _on_all_rows(_name))
LazyRows.__hash__ = None  # type: ignore[assignment]  (as ndarray: compared by value, not hashable)


def is_lazy(arr) -> bool:
    return isinstance(arr, LazyRows)


def take(arr, idx):
    """``arr[idx]`` that stays on disk for :class:`LazyRows` (numpy's copy for an ndarray, as before)."""
    return arr.take(idx) if is_lazy(arr) else arr[idx]


def concat(parts: list):
    """The rows of ``parts`` one after another: lazy when every part is, else ``np.concatenate``."""
    if parts and all(is_lazy(p) for p in parts):
        files, index = [], []
        for p in parts:
            index.append(p.index + np.array([len(files), 0]))
            files += p.files
        return LazyRows(files, np.concatenate(index))
    return np.concatenate([np.asarray(p) for p in parts])


def block_rows(arr, max_bytes: int = BLOCK_BYTES, multiple: int = 1) -> int:
    """Rows of ``arr`` per block of at most ``max_bytes`` (at least ``multiple``, and a multiple of it)."""
    row = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize)
    return max(multiple, (max_bytes // row) // multiple * multiple)


def blocks(arr, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, arr[start:start + rows])`` over ``arr`` (a :class:`LazyRows` or an array); ``rows`` defaults to
    :func:`block_rows`."""
    rows = rows or block_rows(arr)
    for s in range(0, len(arr), rows):
        yield s, arr[s:s + rows]
