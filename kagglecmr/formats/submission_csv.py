"""Submission CSV files: strict reading (every problem one line naming the file and line) and validated,
atomic writing, in any :class:`~kagglecmr.formats.submission.SubmissionFormat`.  Pure numpy; no torch."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from kagglecmr.formats.rle import Shape, image_pixels, parse_rle, quoted, rle_extent
from kagglecmr.formats.submission import CMR, SubmissionFormat
from kagglecmr.utils.errors import SubmissionError
from kagglecmr.utils.io import atomic_write_text

HEADER = list(CMR.header)
DEFAULT_SIDE = 96


def _read_text(path: Path, fmt: SubmissionFormat = CMR) -> str:
    expected = ",".join(fmt.header)
    if not path.exists():
        raise SubmissionError(f"{path}: file not found")
    if not path.is_file():
        raise SubmissionError(f"{path}: not a file (expected a CSV with header '{expected}')")
    data = path.read_bytes()
    if not data.strip():
        raise SubmissionError(f"{path}: empty file (expected header '{expected}')")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SubmissionError(f"{path}: not a CSV text file (not UTF-8)") from None


def _check_row(fields: list[str], shape, fmt: SubmissionFormat = CMR) -> tuple[str, str]:
    """Validate one data row (without its location) and return ``(id, encoding)``."""
    if not fields:
        raise SubmissionError("blank line")
    if len(fields) != 2:
        raise SubmissionError(f"expected 2 fields ({','.join(fmt.header)}), found {len(fields)}")
    rid, enc = fields
    image, _ = fmt.parse_row_id(rid)
    try:
        parse_rle(enc, image_pixels(shape, image), start=fmt.start)
    except SubmissionError as exc:
        raise SubmissionError(f"{rid}: {exc}") from None
    return rid, enc


def parse_submission(text: str, name: str | Path, shape: Shape = None, fmt: SubmissionFormat = CMR) -> dict[str, str]:
    """Parse and validate submission CSV text in format ``fmt``; errors name ``name`` and the line.

    With ``shape`` (one ``(H, W)`` for every image, or ``{image id: (H, W)}``), runs past the
    image's last pixel are errors too.
    """
    reader = csv.reader(io.StringIO(text.rstrip("\r\n"), newline=""), strict=True)
    rows: dict[str, str] = {}
    lines: dict[str, int] = {}
    try:
        header = next(reader, [])
        if header != list(fmt.header):
            raise SubmissionError(f"line 1: header is {quoted(','.join(header))}, expected '{','.join(fmt.header)}'")
        for fields in reader:
            try:
                rid, enc = _check_row(fields, shape, fmt)
                if rid in rows:
                    raise SubmissionError(f"duplicate id {quoted(rid)} (first on line {lines[rid]})")
            except SubmissionError as exc:
                raise SubmissionError(f"line {reader.line_num}: {exc}") from None
            rows[rid], lines[rid] = enc, reader.line_num
    except csv.Error as exc:
        raise SubmissionError(f"{name}: line {reader.line_num}: not valid CSV ({exc})") from None
    except SubmissionError as exc:
        raise SubmissionError(f"{name}: {exc}") from None
    if not rows:
        raise SubmissionError(f"{name}: no rows after the header")
    return rows


def read_submission(path: str | Path, shape: Shape = None, fmt: SubmissionFormat = CMR) -> dict[str, str]:
    """Read a submission / solution CSV ``{id: encoding}`` in file order, strictly validated.

    One-line :class:`SubmissionError` naming the file (and line) for: missing or empty file,
    not UTF-8 text, bad CSV quoting, a header other than exactly ``fmt.header`` (``id,encoding``),
    a row without exactly two fields, a bad or duplicate id, and a malformed encoding (odd count,
    non-integer, start below ``fmt.start`` or length < 1, unsorted or overlapping runs, and with
    ``shape`` runs past the image).  Accepts CRLF line endings, a UTF-8 BOM, a trailing newline
    and ``""`` for an empty encoding.
    """
    path = Path(path)
    return parse_submission(_read_text(path, fmt), path, shape=shape, fmt=fmt)


def submission_text(rows, fmt: SubmissionFormat = CMR) -> str:
    """CSV text of ``(id, encoding)`` rows, header first, ``\\n`` line endings."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fmt.header)
    writer.writerows(rows)
    return buf.getvalue()


def write_submission(rows, path: str | Path, *, shape: Shape, overwrite: bool = False,
                     fmt: SubmissionFormat = CMR) -> Path:
    """Write rows ``(id, encoding)`` as a submission CSV in format ``fmt``, atomically, after validating them.

    The text is parsed back with :func:`parse_submission` (the reader the scorer uses) and
    every encoding is checked against ``shape`` (one ``(H, W)`` or ``{image id: (H, W)}``)
    before anything touches the disk.
    """
    text = submission_text(rows, fmt)
    parse_submission(text, path, shape=shape, fmt=fmt)
    return atomic_write_text(path, text, overwrite=overwrite)


# --------------------------------------------------------------------------- scoring



def infer_shape(rows: dict[str, str], fmt: SubmissionFormat = CMR) -> tuple[int, int]:
    """Image shape for CSV truth: 96x96, or the smallest square holding the last run's pixel."""
    extent = max((rle_extent(enc, start=fmt.start) for enc in rows.values()), default=0)
    side = max(DEFAULT_SIDE, math.isqrt(extent - 1) + 1 if extent else 0)
    return side, side
