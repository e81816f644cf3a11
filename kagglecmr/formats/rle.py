"""Run-length encoding, the competition's row ids, and the ``encode`` command.

A submission row encodes one class ``k`` of one image: the binary mask ``label == k`` is
flattened column-major (``x.T.flatten()``, i.e. down the first column first), and every run of
ones is written as ``start length`` with 1-based ``start``; pairs are separated by spaces and an
empty mask is the empty string.  The row id is the image id, ``_mask`` and the class digit
(``cmr7_mask2``).  That is the CMR format and every default here; other competitions' pixel order
(``order="row"``: along each row first) and 0-based starts (``start=0``) are keywords of the
same functions, and :mod:`kagglecmr.formats.submission` describes a whole format (ids, header, order,
start, classes).

Decoding is strict: every malformed encoding raises :class:`~kagglecmr.utils.errors.SubmissionError`
with a one-line message (callers prefix the file and line).  Pure numpy; no torch.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from kagglecmr.data.loader import DataSpec, mask_id, natural_key, png_size, read_mask
from kagglecmr.utils.errors import DataError, KaggleCMRError, SubmissionError

_IMAGE_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # no commas, quotes or whitespace, so ids need no CSV quoting
IMAGE_ID_RE = re.compile(_IMAGE_ID, re.ASCII)
ORDERS = ("column", "row")
_MAX_DIGITS = 15  # far beyond any image, small enough that int64 arithmetic cannot overflow


def quoted(text: str, limit: int = 40) -> str:
    """A user-supplied string, quoted and escaped for a one-line message (long ones truncated)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --------------------------------------------------------------------------- encoding


def _as_2d(mask) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {arr.shape}")
    return arr


def _flatten(mask, order: str) -> np.ndarray:
    """The mask's pixels in submission order: ``column`` = down each column first, ``row`` = along each row."""
    arr = _as_2d(mask)
    if order == "column":
        return arr.T.ravel()
    if order == "row":
        return arr.ravel()
    raise ValueError(f"pixel order {order!r}: expected one of {', '.join(ORDERS)}")


def _check_start(start: int) -> int:
    if start not in (0, 1) or isinstance(start, bool):
        raise ValueError(f"start {start!r}: the first pixel's index is 0 or 1")
    return int(start)


def encode_rle(mask, *, order: str = "column", start: int = 1) -> str:
    """Encode a 2-D boolean (or 0/1) mask as ``start length`` pairs (default: column-major, 1-based)."""
    pixels = _flatten(np.asarray(mask).astype(bool), order)
    padded = np.concatenate([[False], pixels, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + _check_start(start)  # run starts and one-past-ends
    edges[1::2] -= edges[::2]
    return " ".join(map(str, edges.tolist()))


def parse_rle(enc: str, num_pixels: int | None = None, *, start: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Check an encoding's syntax and return its ``(starts, lengths)`` (as written, int64).

    Raises :class:`SubmissionError` for an odd number of numbers, a token that is not a plain
    decimal integer, a start below ``start`` (the first pixel's index, 1 or 0), a length below 1,
    runs that are unsorted or overlap, and (when ``num_pixels`` is given) a run past the last pixel.
    """
    tokens = enc.split()
    if len(tokens) % 2:
        raise SubmissionError(f"encoding has an odd number of numbers ({len(tokens)}); expected 'start length' pairs")
    for tok in tokens:
        if not (tok.isascii() and tok.isdigit()):
            raise SubmissionError(f"encoding token {quoted(tok, 20)} is not a non-negative integer")
        if len(tok) > _MAX_DIGITS:
            raise SubmissionError(f"encoding number {quoted(tok, 20)} is too large")
    nums = np.array([int(t) for t in tokens], dtype=np.int64)
    starts, lengths = nums[0::2], nums[1::2]
    _check_runs(starts, lengths, num_pixels, _check_start(start))
    return starts, lengths


def _check_runs(starts: np.ndarray, lengths: np.ndarray, num_pixels: int | None, first: int) -> None:
    if (starts < first).any():
        raise SubmissionError(
            f"run start {int(starts[starts < first][0])} is not >= {first} (starts are {first}-based)"
        )
    if (lengths < 1).any():
        i = int(np.flatnonzero(lengths < 1)[0])
        raise SubmissionError(f"run at {int(starts[i])} has length {int(lengths[i])}; lengths must be >= 1")
    ends = starts + lengths  # one past the last pixel of each run
    unsorted = np.flatnonzero(starts[1:] < starts[:-1])
    if unsorted.size:
        i = int(unsorted[0])
        raise SubmissionError(f"runs are not sorted: start {int(starts[i + 1])} follows start {int(starts[i])}")
    overlap = np.flatnonzero(starts[1:] < ends[:-1])
    if overlap.size:
        i = int(overlap[0])
        raise SubmissionError(
            f"runs overlap: '{int(starts[i])} {int(lengths[i])}' reaches pixel {int(ends[i] - 1)}, "
            f"next run starts at {int(starts[i + 1])}"
        )
    if num_pixels is not None and ends.size and ends[-1] - first > num_pixels:
        raise SubmissionError(
            f"run '{int(starts[-1])} {int(lengths[-1])}' ends at pixel {int(ends[-1] - 1)}, "
            f"past the image's {num_pixels} pixels"
        )


def rle_extent(enc: str, *, start: int = 1) -> int:
    """Pixels an image needs to hold an encoding (its last pixel, counted from 1); 0 when empty."""
    starts, lengths = parse_rle(enc, start=start)
    return int(starts[-1] + lengths[-1] - start) if starts.size else 0


def decode_flat(enc: str, num_pixels: int, *, start: int = 1) -> np.ndarray:
    """Decode to a flat boolean array of ``num_pixels`` in submission order (strict, see :func:`parse_rle`)."""
    starts, lengths = parse_rle(enc, num_pixels, start=start)
    steps = np.zeros(num_pixels + 1, dtype=np.int8)
    np.add.at(steps, starts - start, 1)  # add.at: touching runs share an index
    np.add.at(steps, starts - start + lengths, -1)
    return np.cumsum(steps[:-1]) > 0


def decode_rle(enc: str, shape: tuple[int, int], *, order: str = "column", start: int = 1) -> np.ndarray:
    """Decode an encoding to a boolean mask of ``shape`` ``(H, W)``; inverse of :func:`encode_rle`."""
    h, w = shape
    flat = decode_flat(enc, h * w, start=start)
    if order == "column":
        return flat.reshape(w, h).T
    if order == "row":
        return flat.reshape(h, w)
    raise ValueError(f"pixel order {order!r}: expected one of {', '.join(ORDERS)}")


Shape = tuple[int, int] | dict[str, tuple[int, int]] | None  # one (H, W) for every image, or per image


def image_pixels(shape: Shape, image_id: str) -> int | None:
    """Pixels of ``image_id``'s image: ``shape`` is one ``(H, W)``, ``{image id: (H, W)}`` or None."""
    if isinstance(shape, dict):
        shape = shape.get(image_id)
    return None if shape is None else int(shape[0]) * int(shape[1])


# --------------------------------------------------------------------------- row ids


def check_image_id(image_id: str) -> str:
    """Return ``image_id`` if it can be part of a row id (letters, digits, ``_.-``), else raise."""
    if not IMAGE_ID_RE.fullmatch(image_id):
        raise SubmissionError(f"bad image id {quoted(image_id)}: use letters, digits, '_', '.', '-'")
    return image_id


def row_id(image_id: str, k: int) -> str:
    """``("cmr7", 2)`` -> ``"cmr7_mask2"`` (the CMR format; any format: ``SubmissionFormat.row_id``)."""
    from kagglecmr.formats.submission import CMR  # submission builds on this module

    return CMR.row_id(image_id, k)


def parse_row_id(rid: str) -> tuple[str, int]:
    """``"cmr7_mask2"`` -> ``("cmr7", 2)``; raises :class:`SubmissionError` for any other shape."""
    from kagglecmr.formats.submission import CMR

    return CMR.parse_row_id(rid)


def label_to_rows(image_id: str, label_mask, num_classes: int = 4) -> list[tuple[str, str]]:
    """The ``num_classes - 1`` CMR submission rows ``(id, encoding)`` of one label mask."""
    from kagglecmr.formats.submission import CMR

    return CMR.rows(image_id, label_mask, num_classes)


# --------------------------------------------------------------------------- mask folders


def mask_folder_paths(folder: str | Path) -> dict[str, Path]:
    """``{image id: png}`` of a mask folder (``cmrN_mask.png`` or ``cmrN.png``), in natural order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: mask folder not found")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not (p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith(".")):
            continue
        i = mask_id(p)
        try:
            check_image_id(i)
        except SubmissionError as exc:
            raise DataError(f"{p}: {exc}") from None
        if i in found:
            raise DataError(f"{p}: same image id '{i}' as {found[i].name}")
        found[i] = p
    if not found:
        raise DataError(f"{folder}: no PNG masks in folder")
    return dict(sorted(found.items(), key=lambda kv: natural_key(kv[0])))


def read_label_mask(path: str | Path, num_classes: int = 4) -> np.ndarray:
    """``data.read_mask`` at the mask's own size (any square size; labels ``< num_classes``)."""
    path = Path(path)
    h, w = png_size(path)
    if h != w:
        raise DataError(f"{path}: mask is {w}x{h}; only square masks are supported")
    return read_mask(path, DataSpec(size=h, num_classes=num_classes))


def masks_to_rows(paths: dict[str, Path], num_classes: int = 4, fmt=None):
    """Submission rows of label masks ``{image id: png}`` in format ``fmt`` (default CMR), and their size.

    The size is ``(H, W)`` when every mask has the same, else ``{image id: (H, W)}``; both are
    what :func:`kagglecmr.formats.metric.write_submission` and ``read_submission`` take as ``shape``.
    """
    from kagglecmr.formats.submission import CMR

    fmt = CMR if fmt is None else fmt
    rows: list[tuple[str, str]] = []
    shapes: dict[str, tuple[int, int]] = {}
    for i, p in paths.items():
        m = read_label_mask(p, num_classes)
        shapes[i] = m.shape
        rows.extend(fmt.rows(i, m, num_classes))
    if not shapes:
        raise DataError("no masks given")
    sizes = set(shapes.values())
    return rows, (sizes.pop() if len(sizes) == 1 else shapes)


# --------------------------------------------------------------------------- command


def run_encode(mask_dir: str | Path, out: str | Path, force: bool = False, num_classes: int = 4, fmt=None) -> int:
    """``kagglecmr encode``: PNG label masks -> validated submission CSV; returns the rows written.

    Rows are in natural image order (cmr2 before cmr10), the row classes of ``fmt`` (a
    :class:`~kagglecmr.formats.submission.SubmissionFormat`, default CMR: ``1..num_classes-1``) within an
    image; masks may differ in size.  The CSV is parsed back with the scorer's reader before it is
    written atomically; an existing ``out`` is refused (and left untouched) unless ``force``.
    """
    from kagglecmr.formats.metric import write_submission  # score imports this module
    from kagglecmr.formats.submission import CMR

    fmt = CMR if fmt is None else fmt
    out = Path(out)
    if num_classes < 2:
        raise KaggleCMRError(f"--num-classes {num_classes}: need at least 2 (background and one class)")
    try:
        classes = fmt.row_classes(num_classes)
    except ValueError as exc:
        raise KaggleCMRError(f"--num-classes {num_classes}: {exc}") from None
    if out.exists() and not force:
        raise KaggleCMRError(f"{out}: already exists (use --force to overwrite)")
    rows, shape = masks_to_rows(mask_folder_paths(mask_dir), num_classes, fmt)
    write_submission(rows, out, shape=shape, overwrite=force, fmt=fmt)
    print(_encode_summary(rows, out, classes, fmt))
    return len(rows)


def _encode_summary(rows: list[tuple[str, str]], out: Path, classes: list[int], fmt) -> str:
    empty = {k: 0 for k in classes}
    for rid, enc in rows:
        if not enc:
            empty[fmt.parse_row_id(rid)[1]] += 1
    per_class = ", ".join(f"class {fmt.class_label(k)}: {n}" for k, n in empty.items())
    n_images = len(rows) // len(classes)
    return f"wrote {out}: {len(rows)} rows ({n_images} images x {len(classes)} classes); empty rows {per_class}"
