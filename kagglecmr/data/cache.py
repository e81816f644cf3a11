"""The decoded-array cache: a split decoded once into uint8 arrays on disk, opened memory-mapped afterwards.

The first command that needs a split (at the model size) decodes it, in parallel threads with a progress
line and an ETA, into ``images.npy`` (``[N, H, W, C]``) and ``masks.npy`` (``[N, H, W]``) under
``<cache>/<key>/``, and every later command opens them as :class:`~kagglecmr.data.rows.LazyRows`, which read
the rows indexed (a batch, a block) from the files: RAM holds the working set, not the dataset, and the OS page
cache keeps a small dataset as fast as an in-memory one.

``<key>`` is the sha256 of the resolved dataset (its description: channels, value map, size, format...), the
split, whether masks are read, and every image's and mask file's path, size and modification time: a changed,
added or removed file gives a new key (the old entry stays until the user deletes the folder).
Entries are written into a temporary folder and renamed into place, so a crash never leaves half an entry.

Where: ``--cache-dir`` (the commands' option), else ``$KAGGLECMR_CACHE``, else ``$XDG_CACHE_HOME/kagglecmr``
(``~/.cache/kagglecmr``).  ``KAGGLECMR_CACHE=off`` decodes into memory as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kagglecmr.data.loader import Split
from kagglecmr.data.rows import LazyRows
from kagglecmr.utils.errors import DataError
from kagglecmr.utils.io import atomic_write_json
from kagglecmr.utils.npz import NpyWriter

ENV = "KAGGLECMR_CACHE"
OFF = ("off", "none", "0", "")
VERSION = 1  # bump when the arrays' meaning changes
PARALLEL_MIN = 64  # fewer images than this are decoded in this process (process start-up would dominate)
_override: Path | str | None = None  # set by --cache-dir for this process


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """``--cache-dir``: where entries go for the rest of this process (``"off"``: no cache)."""
    global _override
    _override = None if path is None else str(path)
    if path is not None:
        os.environ[ENV] = str(path)  # --jobs children and Ray workers inherit it


def cache_root() -> Path | None:
    """The cache folder, or None when the cache is off."""
    value = _override if _override is not None else os.environ.get(ENV)
    if value is not None:
        return None if str(value).strip().lower() in OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kagglecmr"


def _fingerprint(path) -> list:
    """``[path, size, mtime]`` of a file; of each file of a united mask; of the CSV of a labels-CSV mask."""
    if hasattr(path, "paths"):  # several mask files of one image (a * in the mask pattern)
        return [_fingerprint(p) for p in path.paths]
    p = Path(getattr(getattr(path, "table", None), "path", path))  # a labels CSV row: the CSV file
    try:
        st = p.stat()
    except OSError:
        raise DataError(f"{p}: file not found (the dataset changed while it was read?)") from None
    return [str(p.resolve()), st.st_size, st.st_mtime_ns] + ([path.image_id] if hasattr(path, "image_id") else [])


def split_key(ds, split: str, masks: bool) -> str:
    """The cache key of ``ds``'s ``split`` (see the module docstring)."""
    desc = {k: v for k, v in ds.describe().items()  # the metric changes no array; no void: the keys of before
            if k not in ("notes", "recipe", "name", "metric") and not (k == "ignore" and not v)}
    files = [[i, _fingerprint(ip), _fingerprint(mp) if masks else None] for i, ip, mp in ds.items(split)]
    blob = json.dumps([VERSION, desc, list(ds.size), split, masks, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _decode(args):
    ds, ip, mp, masks = args
    img = ds.read_image(ip, resize=False)
    m = ds.read_mask(mp, resize=False) if masks else None
    return img, m


def load_split(ds, split: str, masks: bool, decode_one) -> Split:
    """``split`` of ``ds`` at the model size from the cache (building the entry first when missing);
    ``decode_one(img, mask_or_None, ip, mp) -> (image at model size, mask at model size or None)`` finishes one
    decoded item exactly as :meth:`Dataset.load` does."""
    root = cache_root()
    items = ds.items(split)
    entry = root / split_key(ds, split, masks)
    if not (entry / "meta.json").is_file():
        _build(entry, ds, items, masks, decode_one)
    meta = json.loads((entry / "meta.json").read_text())
    images = LazyRows.of_file(entry / "images.npy")
    mask_arr = LazyRows.of_file(entry / "masks.npy") if masks else None
    return Split(ids=list(meta["ids"]), images=images, masks=mask_arr, splits=[split] * len(meta["ids"]),
                 image_paths=[ip for _, ip, _ in items], orig_sizes=[tuple(s) for s in meta["sizes"]])


def _build(entry: Path, ds, items, masks: bool, decode_one) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        n, (h, w), c = len(items), ds.size, ds.in_channels
        # plain writes, not a memory map: its dirty pages would count in this process's memory
        images = NpyWriter(tmp / "images.npy", (n, h, w, c), np.uint8)
        mask_arr = NpyWriter(tmp / "masks.npy", (n, h, w), np.uint8) if masks else None
        sizes, t0 = [], time.time()
        shown = t0
        jobs = [(ds, ip, mp, masks) for _, ip, mp in items]
        workers = min(os.cpu_count() or 1, 8) if n >= PARALLEL_MIN else 1
        # threads: OpenCV decodes and resizes without the GIL, and unlike processes they need no pickling of the
        # dataset, no fork of a process with running torch threads (a deadlock) and no re-import of the user's script
        pool = ThreadPoolExecutor(workers) if workers > 1 else None
        try:
            decoded = _in_order(pool, jobs, 4 * workers) if pool else map(_decode, jobs)
            for k, ((img, m), (_, ip, mp)) in enumerate(zip(decoded, items)):
                sizes.append(list(img.shape[:2]))
                im, mk = decode_one(img, m, ip, mp)
                images.write(np.reshape(im, (1, h, w, c)))
                if masks:
                    mask_arr.write(np.reshape(mk, (1, h, w)))
                if n >= PARALLEL_MIN and (time.time() - shown > 2 or k + 1 == n):
                    done, el = k + 1, time.time() - t0
                    print(f"cache: decoded {done}/{n} images ({done / max(el, 1e-9):.0f}/s, "
                          f"ETA {el / done * (n - done):.0f}s)", file=sys.stderr, flush=True)
                    shown = time.time()
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
            images.close(sync=True)
            if mask_arr is not None:
                mask_arr.close(sync=True)
        atomic_write_json(tmp / "meta.json", {"ids": [i for i, _, _ in items], "sizes": sizes, "version": VERSION,
                                              "dataset": str(ds.path), "masks": masks})
        try:
            tmp.rename(entry)
        except OSError:  # another process built the same entry meanwhile: theirs is as good
            if not (entry / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _in_order(pool, jobs, window: int):
    """``pool.map(_decode, jobs)`` with at most ``window`` images decoded ahead of the writer (``map`` would
    decode them all ahead when writing is slower: the whole split in memory)."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(_decode, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
