"""An ``.npz`` written block by block: arrays larger than memory (a fold's out-of-fold probabilities at full
resolution) go to ``np.load`` readers exactly as :func:`numpy.savez_compressed` would have stored them.

::

    with NpzWriter(path) as npz:
        npz.add("ids", ids)                                  # small: kept until the file is written
        probs = npz.array("probs", (n, k, h, w), np.float16)  # large: spooled to disk block by block
        for block in ...:
            probs.write(block)                               # rows in order, any number at a time

A large array is spooled into a ``.npy`` file beside ``path``; on leaving the block without an error the
entries are deflated into the zip in the order they were declared, a few MB at a time, and the file is moved
into place atomically (:func:`kagglecmr.utils.io.atomic_path`).  On an error nothing is written and the spool
files are removed.  Pure numpy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from kagglecmr.utils.io import atomic_path

COPY_BYTES = 16 << 20


class NpyWriter:
    """A ``.npy`` file of ``shape`` written row block after row block with plain writes (a memory map's dirty
    pages would count in the writer's resident memory until written back); ``close(sync=True)`` fsyncs it."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(int(s) for s in shape), np.dtype(dtype)
        self.rows = 0
        self.fh = open(self.path, "wb")  # noqa: SIM115 (written by write() calls, closed by close())
        fmt = np.lib.format
        fmt.write_array_header_1_0(self.fh, {"descr": fmt.dtype_to_descr(self.dtype), "fortran_order": False,
                                             "shape": self.shape})

    def write(self, block: np.ndarray) -> None:
        block = np.asarray(block)
        if block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise ValueError(f"{self.path.name}: block {block.shape} does not continue an array of {self.shape} "
                             f"after {self.rows} rows")
        self.fh.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += len(block)

    def close(self, sync: bool = False) -> None:
        if not self.fh.closed:
            if sync:
                self.fh.flush()
                os.fsync(self.fh.fileno())
            self.fh.close()


class NpzWriter:
    """See the module docstring."""

    def __init__(self, path, *, compress: bool = True):
        self.path = Path(path)
        self.compress = compress
        self.entries: list[tuple[str, object]] = []
        self.spool: Path | None = None

    def __enter__(self) -> NpzWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.spool = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        return self

    def add(self, name: str, array) -> None:
        self.entries.append((name, np.asanyarray(array)))

    def array(self, name: str, shape: tuple[int, ...], dtype) -> NpyWriter:
        out = NpyWriter(self.spool / f"{len(self.entries)}.npy", shape, dtype)
        self.entries.append((name, out))
        return out

    def __exit__(self, kind, exc, tb) -> None:
        try:
            for _, e in self.entries:
                if isinstance(e, NpyWriter):
                    e.close()
            if kind is None:
                self._write()
        finally:
            shutil.rmtree(self.spool, ignore_errors=True)

    def _write(self) -> None:
        for name, e in self.entries:
            if isinstance(e, NpyWriter) and e.rows != e.shape[0]:
                raise ValueError(f"{self.path}: '{name}' got {e.rows} of its {e.shape[0]} rows")
        how = zipfile.ZIP_DEFLATED if self.compress else zipfile.ZIP_STORED
        with atomic_path(self.path) as tmp, zipfile.ZipFile(tmp, "w", compression=how, allowZip64=True) as zf:
            for name, e in self.entries:
                with zf.open(f"{name}.npy", "w", force_zip64=True) as dst:
                    if isinstance(e, NpyWriter):
                        with open(e.path, "rb") as src:
                            shutil.copyfileobj(src, dst, COPY_BYTES)
                    else:
                        np.lib.format.write_array(dst, e, allow_pickle=False)
