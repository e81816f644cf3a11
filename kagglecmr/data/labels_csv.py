"""Training masks given as a run-length CSV (Kaggle's ``train.csv``) instead of one PNG per image.

A split's ``mask:`` may name a CSV file (no ``{id}``): its rows are ``(row id, encoding)`` pairs in the
layout the dataset file's ``labels:`` mapping describes, else in the dataset's ``submission:`` format
(most competitions ship their training labels in the format they score)::

    splits:
      train: {image: "train_images/{id}.jpg", mask: "train.csv"}
    classes: [background, "1", "2", "3", "4"]
    labels: {id: "{id}.jpg", header: [ImageId, EncodedPixels], class_column: ClassId}

``labels`` keys: ``id`` (row id template, as the submission's: ``{id}``, ``{class}`` or ``{name}``),
``header`` (the id and encoding column names; other columns are ignored), ``order`` and ``start``,
and ``class_column`` (the class of each row in its own column, as an index or a class name; the id
template then holds ``{id}`` only).  Several rows for one image and class are united (one row per
instance); an image without rows has an empty mask; where classes overlap the higher index wins, or with
``task: multilabel`` each class keeps its own bit of a packed map (:mod:`kagglecmr.formats.multilabel`).
A row naming an image the split does not have, an unknown class or a malformed encoding is a
one-line :class:`~kagglecmr.utils.errors.DataError` naming the CSV and its line.  Pure numpy; no torch.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kagglecmr.data.loader import image_size
from kagglecmr.formats.submission import SubmissionFormat
from kagglecmr.utils.errors import ConfigError, DataError, SubmissionError

LABEL_KEYS = ("id", "header", "order", "start", "class_column")


def is_csv_pattern(pattern: str | None) -> bool:
    return pattern is not None and "{id}" not in pattern and pattern.lower().endswith(".csv")


class CsvLabels:
    """One labels CSV, read once: ``{image id: {class: [encodings]}}`` and the format to decode them."""

    def __init__(self, path: Path, labels: dict | None, submission: dict | None, class_names: list[str] | None,
                 source: str, *, multilabel: bool = False):
        """``labels``: the dataset file's ``labels:`` mapping; without it the ``submission:`` format's
        row layout (its ``classes``, which rows a submission has, do not apply to training labels).
        ``multilabel``: classes overlap (``class_names`` are then the label names, ``NO_CLASS`` first)."""

        self.path, self.source, self.multilabel = Path(path), source, multilabel
        spec = dict(labels) if labels is not None else {k: v for k, v in (submission or {}).items() if k != "classes"}
        unknown = [k for k in spec if k not in LABEL_KEYS]
        if unknown:
            raise DataError(f"{source}: labels: unknown key {unknown[0]!r} (known: {', '.join(LABEL_KEYS)})")
        self.class_column = spec.pop("class_column", None)
        if self.class_column is not None and not isinstance(self.class_column, str):
            raise DataError(f"{source}: labels: class_column: expected a column name")
        fmt_dict = {k: v for k, v in spec.items() if k in ("id", "header", "order", "start")}
        if self.class_column is not None:
            fmt_dict.setdefault("id", "{id}")
        k = len(class_names) if class_names else None
        try:
            # the id template is parsed with placeholder classes; the real count comes from the rows
            one = k is None or self.class_column is not None
            probe = SubmissionFormat.from_dict({**fmt_dict, "classes": [1]} if one else fmt_dict,
                                               num_classes=k or 2, class_names=class_names, source=f"{source}: labels")
        except ConfigError as exc:
            raise DataError(str(exc)) from None
        field = probe._class_field
        if self.class_column is not None and field is not None:
            raise DataError(f"{source}: labels: with class_column the id template holds {{id}} only, not {probe.id!r}")
        if field == "name" and not class_names:
            raise DataError(f"{source}: labels: id template {probe.id!r} names classes: list them in classes:")
        self.fmt = probe if field != "class" or k is not None else \
            SubmissionFormat(id=probe.id, header=probe.header, order=probe.order, start=probe.start)
        self.class_names = list(class_names) if class_names else None
        self.rows: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        self.lines: dict[str, int] = {}
        self.num_classes = self._read(k)

    def _class_of(self, value: str, line: int, k: int | None) -> int:
        v = value.strip()
        if self.class_names and v in self.class_names:
            c = self.class_names.index(v)
        elif v.isdigit():
            c = int(v)
        else:
            raise DataError(f"{self.path} line {line}: class {v!r} is not a class index or name")
        if c < 1 or (k is not None and c >= k):
            raise DataError(f"{self.path} line {line}: class {v!r} is not a foreground class"
                            + (f" (1..{k - 1})" if k else ""))
        return c

    def _read(self, k: int | None) -> int:
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{self.path}: labels CSV is empty")
                want = [*self.fmt.header] + ([self.class_column] if self.class_column else [])
                missing = [c for c in want if c not in header]
                if missing:
                    raise DataError(f"{self.path}: no column {missing[0]!r} (columns: {', '.join(header)}; "
                                    f"set labels: header / class_column in {self.source})")
                col = [header.index(c) for c in want]
                top = 0
                for n, row in enumerate(reader, start=2):
                    if not row:
                        continue
                    if len(row) < len(header):
                        raise DataError(f"{self.path} line {n}: {len(row)} fields, the header has {len(header)}")
                    rid, enc = row[col[0]].strip(), row[col[1]].strip()
                    try:
                        image, c = self.fmt.parse_row_id(rid)
                    except SubmissionError as exc:
                        raise DataError(f"{self.path} line {n}: {exc}") from None
                    if self.class_column:
                        c = self._class_of(row[col[2]], n, k)
                    elif k is not None and c >= k:
                            raise DataError(f"{self.path} line {n}: class {c} but {self.source} has {k} classes")
                    self.lines.setdefault(image, n)
                    if enc and enc.lower() != "nan":
                        self.rows[image][c].append(enc)
                        top = max(top, c)
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.path}: cannot read labels CSV ({getattr(exc, 'strerror', None) or exc})") from None
        except csv.Error as exc:
            raise DataError(f"{self.path}: not a valid CSV ({exc})") from None
        return k or max(2, top + 1)

    def check_ids(self, known: set[str]) -> None:
        """Every image the CSV names must be one of the splits' images that read it."""
        for image, line in self.lines.items():
            if image not in known:
                raise DataError(f"{self.path} line {line}: image {image!r} has no image file in the dataset")

    def mask(self, image_id: str, hw: tuple[int, int]) -> np.ndarray:
        """The class label map (``0..K-1``; multilabel: packed bits) of one image at its size ``hw``."""
        m = np.zeros(hw, np.uint8 if self.num_classes <= 256 else np.uint16)
        for c in sorted(self.rows.get(image_id, {})):
            for enc in self.rows[image_id][c]:
                try:
                    where = self.fmt.decode(enc, hw)
                    if self.multilabel:
                        m[where] |= 1 << (c - 1)
                    else:
                        m[where] = c
                except SubmissionError as exc:
                    raise DataError(f"{self.path} line {self.lines[image_id]}: image {image_id!r} "
                                    f"({hw[1]}x{hw[0]}): {exc}") from None
        return m


@dataclass(frozen=True)
class CsvMask:
    """Where one image's mask lies in a labels CSV (what a PNG path is for file masks)."""

    table: CsvLabels
    image_id: str
    image_path: Path

    def decode(self) -> np.ndarray:

        return self.table.mask(self.image_id, image_size(self.image_path))

    def __str__(self) -> str:
        return f"{self.table.path} ({self.image_id})"
