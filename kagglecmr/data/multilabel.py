"""Overlapping classes in a dataset file (``task: multilabel``): one binary mask file per image and class.

The mask pattern names the class with ``{name}`` (its name in ``classes``) or ``{class}`` (its number, 1..K)::

    task: multilabel
    classes: [large_bowel, small_bowel, stomach]
    splits:
      train: {image: "images/{id}.png", mask: "GT/{name}/{id}_{name}.png"}
    missing: empty          # an image without a class's file: that class is empty (or: error)

Each file is binary; ``mask_values`` applies to every file on its own: ``auto`` maps ``{0, v}`` to
``{0, 1}``, ``threshold`` / ``nonzero`` are the binary rules, a map sends each raw value to 0 or 1.  One
image's files are read into one packed label map (bit ``c - 1`` = class ``c``,
:mod:`kagglecmr.formats.multilabel`), so the rest of the data layer handles it as any label map.  A file
without an image, and with ``missing: error`` an image without a class's file, is a one-line
:class:`~kagglecmr.utils.errors.DataError` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kagglecmr.data import loader as D
from kagglecmr.data.labels_csv import CsvMask
from kagglecmr.data.mask_values import MASK_RULES, auto_mask_map, binary_mask, decode_raw, map_values, parse_raw
from kagglecmr.formats.multilabel import pack
from kagglecmr.utils.errors import DataError
from kagglecmr.utils.naming import natural_sorted

CLASS_FIELDS = ("{name}", "{class}")


def class_pattern_field(pattern: str | None) -> str | None:
    """The class field (``{name}`` or ``{class}``) a mask pattern holds, or None."""
    return next((f for f in CLASS_FIELDS if pattern and f in pattern), None)


def class_pattern(pattern: str, c: int, name: str) -> str:
    """The pattern of class ``c`` (1..K) named ``name``."""
    return pattern.replace("{name}", name).replace("{class}", str(c))


@dataclass(frozen=True)
class ClassFiles:
    """The mask files of one image, one per class (None: no file, the class is empty there)."""

    files: tuple  # Path | MaskUnion | None per class, in class order
    image_path: Path

    @property
    def paths(self) -> tuple:
        """The files that exist (what the cache's fingerprint hashes)."""
        return tuple(p for p in self.files if p is not None)

    def __str__(self) -> str:
        first = next(iter(self.paths), None)
        return f"{first if first is not None else self.image_path} ({len(self.paths)} of {len(self.files)} class files)"


def class_masks(pattern: str, classes: list[str], images: dict[str, Path], match: Callable[[str], dict], *,
                root: Path, missing: str, where: str) -> dict[str, ClassFiles]:
    """``{image id: ClassFiles}`` of every image: ``match(class pattern) -> {id: file}`` per class."""
    found = []
    for c, name in enumerate(classes, start=1):
        files = match(class_pattern(pattern, c, name))
        for i, p in files.items():
            if i not in images:
                raise DataError(f"{p}: mask of class '{name}' has no image (id '{i}')")
        found.append(files)
    if missing == "error":
        for i in images:
            for c, (name, files) in enumerate(zip(classes, found), start=1):
                if i not in files:
                    expected = root / class_pattern(pattern, c, name).replace("{id}", i)
                    raise DataError(f"{expected}: mask file of class '{name}' missing ({where}; missing: error; "
                                    "missing: empty reads it as an empty class)")
    return {i: ClassFiles(tuple(files.get(i) for files in found), ip) for i, ip in images.items()}


def resolve_class_map(path: Path, items: dict, masked: dict, spec_map) -> tuple[dict[int, int], str | None]:
    """``(value map {raw: 0 or 1}, binary rule or None)`` that reads every class file of a multilabel dataset."""
    if spec_map in MASK_RULES:
        return {0: 0, 255: 1}, spec_map
    if isinstance(spec_map, dict):
        parsed = {}
        for key, v in spec_map.items():
            raw, colour = parse_raw(key)
            if colour:
                raise DataError(f"{path}: mask_values: task multilabel reads grey binary files; colour {key!r} "
                                "is not supported")
            if v not in (0, 1):
                raise DataError(f"{path}: mask_values: {key} -> {v}: with task multilabel each class file is "
                                "binary: map every value to 0 or 1")
            parsed[raw] = int(v)
        spec_map = parsed
    values: dict[int, object] = {}
    for split, rows in items.items():
        for _, _, mp in rows if masked.get(split) else []:
            for p in [] if isinstance(mp, CsvMask) else mp.paths:
                for v in np.unique(decode_raw(p)).tolist():
                    values.setdefault(int(v), p)
    if isinstance(spec_map, dict):
        for v, p in values.items():
            if v not in spec_map:
                raise DataError(f"{p}: mask value {v} is not in {path}'s mask_values")
        return spec_map, None
    if not values:  # every class empty everywhere, or labels from a CSV
        return {0: 0, 1: 1}, None
    return auto_mask_map(values, 2, f"{path} (task multilabel: each class file is binary)"), None


def read_class_files(files: ClassFiles, mapping: dict[int, int], rule: str | None, dataset: str) -> np.ndarray:
    """One image's class files -> its packed label map (uint8 ``[H, W]`` at the files' size)."""
    masks: list[np.ndarray | None] = []
    shape = None
    for p in files.files:
        if p is None:
            masks.append(None)
            continue
        raw = decode_raw(p, grey=rule is not None)
        m = binary_mask(raw, rule) if rule else map_values(raw, mapping, str(p), dataset)
        if shape is not None and m.shape != shape:
            raise DataError(f"{p}: mask size {m.shape[1]}x{m.shape[0]} differs from the image's other class "
                            f"files ({shape[1]}x{shape[0]})")
        shape = m.shape
        masks.append(m)
    if shape is None:
        shape = D.image_size(files.image_path)
    return pack(np.stack([np.zeros(shape, np.uint8) if m is None else m for m in masks]))


def read_class_folder(folder: str | Path, classes: list[str], mapping: dict[int, int], rule: str | None,
                      dataset: str) -> dict[str, np.ndarray]:
    """Packed maps ``{image id: [H, W]}`` of a folder of class masks ``<folder>/<class>/<id>.png`` (as
    ``ensemble --save-masks`` and ``predict`` write them; a missing file is an empty class), in natural order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: mask folder not found")
    files: list[dict[str, Path]] = []
    for name in classes:
        sub = folder / name
        files.append({p.stem: p for p in sorted(sub.glob("*.png")) if p.is_file() and not p.name.startswith(".")}
                     if sub.is_dir() else {})
    ids = natural_sorted({i for f in files for i in f})
    if not ids:
        raise DataError(f"{folder}: no class masks (expected {folder}/<class>/<id>.png for classes "
                        f"{', '.join(classes)})")
    return {i: read_class_files(ClassFiles(tuple(f.get(i) for f in files), folder), mapping, rule, dataset)
            for i in ids}
