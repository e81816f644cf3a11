"""Run-length encoding of binary masks and the image ids a row id may hold.

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

import numpy as np

from kagglecmr.utils.errors import SubmissionError

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
