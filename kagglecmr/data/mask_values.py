"""Mask values on disk <-> class labels: the dataset file's ``mask_values`` (pure numpy; no torch).

``mask_values`` is ``auto``, a map ``{raw value: class}``, or for a binary task ``threshold`` / ``nonzero``.
Raw values are grey levels (8 or 16 bits) or, for colour-coded masks, RGB colours written ``"#rrggbb"``
(``{"#000000": 0, "#ff0000": 1}``); inside, a colour is the integer ``0xRRGGBB`` and a grey mask read
as colour has ``r = g = b``.  ``auto``: labels 0..K-1 stay; {0, v} -> {0, 1}; K evenly spaced grey
levels -> 0..K-1; black plus one colour -> {0, 1}; anything else is a one-line error that lists the
values found and suggests a map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kagglecmr.data import loader as D
from kagglecmr.data.labels_csv import CsvMask
from kagglecmr.utils.errors import DataError

MAX_LABEL_CLASSES = 32  # a folder's mask values below this are class labels; above, grey levels (mask_values: auto)

MASK_RULES = ("nonzero", "threshold")
_HEX = re.compile(r"#[0-9a-fA-F]{6}")


def binary_mask(raw: np.ndarray, rule: str) -> np.ndarray:
    """``nonzero`` (any value > 0 is foreground: instance-id masks) or ``threshold`` (values from half the
    pixel type's range up: 128 of 8 bits, 32768 of 16 bits; JPEG or anti-aliased masks)."""
    if rule == "nonzero":
        return (raw > 0).astype(np.uint8)
    return (raw >= (128 if raw.dtype == np.uint8 else 32768)).astype(np.uint8)


def hex_colour(code: int) -> str:
    return f"#{int(code):06x}"


def parse_raw(key) -> tuple[int, bool]:
    """A ``mask_values`` key -> ``(raw value, is a colour)``: an int grey level, ``"#rrggbb"``, or a digit
    string (keys read back from JSON)."""
    if isinstance(key, str) and _HEX.fullmatch(key):
        return int(key[1:], 16), True
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and key >= 0:
        return int(key), False
    if isinstance(key, str) and key.isdigit():
        return int(key), False
    raise ValueError(f"{key!r} is neither a grey level (0, 255, ...) nor a colour '#rrggbb'")


def colour_codes(bgr: np.ndarray) -> np.ndarray:
    """``[H, W]`` grey or ``[H, W, 3+]`` BGR(A) uint8 (OpenCV's order) -> ``0xRRGGBB`` codes (uint32)."""
    a = np.asarray(bgr)
    if a.ndim == 2:
        return a.astype(np.uint32) * 0x010101
    b, g, r = (a[:, :, i].astype(np.uint32) for i in range(3))
    return (r << 16) | (g << 8) | b


def codes_to_bgr(codes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`colour_codes`: ``[H, W, 3]`` BGR uint8 for ``cv2.imwrite``."""
    c = np.asarray(codes, np.uint32)
    return np.stack([c & 0xFF, (c >> 8) & 0xFF, (c >> 16) & 0xFF], axis=-1).astype(np.uint8)


def decode_colour_mask(path: str | Path) -> np.ndarray:
    """A colour-coded mask as ``0xRRGGBB`` codes (uint32 ``[H, W]``; grey pixels have r = g = b)."""
    path = Path(path)
    m = D.imread(path, cv2.IMREAD_UNCHANGED)
    if m.dtype != np.uint8:
        raise DataError(f"{path}: colour masks must be 8-bit (found {m.dtype})")
    return colour_codes(m if m.ndim == 2 or m.shape[2] >= 3 else m[:, :, 0])


def map_values(raw: np.ndarray, mapping: dict[int, int], where: str, dataset: str) -> np.ndarray:
    """Class labels (uint8) of raw values through ``{raw: class}``: grey levels by a lookup table over
    0..max, colour codes (uint32) by their distinct values.  A value outside the map is an error naming
    ``where`` (the mask file) and the first such value in raster order."""
    colour = raw.dtype == np.uint32
    if colour:
        keys, inverse = np.unique(raw, return_inverse=True)
        m = np.array([mapping.get(int(v), -1) for v in keys], np.int16)[inverse.reshape(raw.shape)]
    else:
        lut = np.full(int(raw.max(initial=0)) + 1, -1, np.int16)
        for v, k in mapping.items():
            if v < len(lut):
                lut[v] = k
        m = lut[raw]
    if (m < 0).any():
        bad = int(raw[m < 0][0])
        shown = ", ".join(hex_colour(v) if colour else str(v) for v in sorted(mapping))
        raise DataError(f"{where}: mask value {hex_colour(bad) if colour else bad} is not in {dataset}'s "
                        f"mask_values ({shown})")
    return m.astype(np.uint8)


def class_to_raw(mask_values: dict, num_classes: int) -> np.ndarray:
    """Lookup table ``class -> raw mask value`` from ``{raw: class}`` (keys may be strings, as in
    ``dataset.json``, or colours): the smallest raw value of each class wins; a class without one keeps
    its index."""
    lut = np.arange(num_classes, dtype=np.int64)
    seen = set()
    for raw, k in sorted((parse_raw(r)[0], int(c)) for r, c in mask_values.items()):
        if 0 <= k < num_classes and k not in seen:
            lut[k] = raw
            seen.add(k)
    return lut


def is_colour_map(mask_values: dict) -> bool:
    return any(parse_raw(r)[1] for r in mask_values)


def labels_to_raw(labels: np.ndarray, mask_values: dict, num_classes: int) -> np.ndarray:
    """Class maps -> the dataset's own mask values: grey (uint8, or uint16 past 255) or BGR colour."""
    lut = class_to_raw(mask_values, num_classes)
    if is_colour_map(mask_values):
        return codes_to_bgr(lut[np.asarray(labels)])
    return lut.astype(np.uint16 if lut.max() > 255 else np.uint8)[np.asarray(labels)]


def auto_mask_map(values, num_classes: int | None, where: str, *, colour: bool = False) -> dict[int, int]:
    """``mask_values: auto``: 0..K-1 stay; {0, v} -> {0, 1}; K evenly spaced grey levels -> 0..K-1;
    colour masks: black and one colour -> {0, 1}, more colours need a map (the error suggests one)."""
    vs = sorted(int(v) for v in values)
    n, k = len(vs), num_classes
    if colour:
        if n == 2 and vs[0] == 0 and k in (None, 2):
            return {0: 0, vs[1]: 1}
        suggestion = ", ".join(f'"{hex_colour(v)}": {i}' for i, v in enumerate(vs[:12]))
        raise DataError(f"{where}: the masks are colour-coded ({n} colours); say which colour is which class, "
                        f"e.g. mask_values: {{{suggestion}{', ...' if n > 12 else ''}}}; a binary mask saved as a "
                        f"colour JPEG: mask_values: threshold")
    if k is not None and vs and vs[-1] < k:
        return {v: v for v in range(k)}
    if k is None and n >= 2 and vs == list(range(n)):
        return {v: v for v in range(n)}
    if n == 2 and vs[0] == 0 and k in (None, 2):
        return {0: 0, vs[1]: 1}
    if n >= 3 and vs[0] == 0 and k in (None, n) and all(abs(v - i * vs[-1] / (n - 1)) <= 1 for i, v in enumerate(vs)):
        return {v: i for i, v in enumerate(vs)}
    shown = ", ".join(map(str, vs[:12])) + (", ..." if n > 12 else "")
    raise DataError(f"{where}: mask_values auto cannot map the mask values found ({shown}) to "
                    f"{k or 'its'} classes; give a map, e.g. mask_values: {{{vs[0]}: 0, {vs[-1]}: 1}}, or for a "
                    f"binary task mask_values: threshold (noisy 0/255, e.g. JPEG) or nonzero (instance ids)")


# ------------------------------------------------------------------ the folder form's labels
class LabelGapError(DataError):
    """Folder-form mask values that are not the class labels 0..K-1: classes ``0..k-1`` are all seen, ``top`` is
    the largest value found (a pinned ``data.num_classes`` above it accepts the values)."""

    def __init__(self, message: str, k: int, top: int):
        super().__init__(message)
        self.k, self.top = k, top


def folder_labels(values: dict[int, Path]) -> int:
    """Number of classes of a folder's label masks (``values``: each value found -> the first mask file holding
    it, in reading order): 0..K-1 with every class 1..K-1 present (at least 2 classes).  Anything else is a
    :class:`LabelGapError` naming the first file holding a value past the gap."""
    k = 1
    while k in values:
        k += 1
    odd = [v for v in values if v >= k]  # reading order: the first is in the first file with an odd value
    if not odd:
        return max(2, k)
    missing = [c for c in range(k, max(odd)) if c not in values]
    gap = ", ".join(map(str, missing[:4])) + (f", ..., {missing[-1]}" if len(missing) > 4 else "")
    shown = ", ".join(map(str, sorted(values)[:12])) + (", ..." if len(values) > 12 else "")
    raise LabelGapError(f"{values[odd[0]]}: mask value {odd[0]} is not a class label 0..{max(2, k) - 1} (the training "
                        f"masks hold {shown}; class{'es' if len(missing) > 1 else ''} {gap} never appear"
                        f"{'s' if len(missing) == 1 else ''}): fix the mask, or pin data.num_classes "
                        f"({max(odd) + 1} or more) if every value is a class", max(2, k), max(odd))


# ------------------------------------------------------------------ a dataset's mask files
@dataclass(frozen=True)
class MaskUnion:
    """Several mask files of one image (a ``*`` in the mask pattern: one file per object or class, as in
    DSB 2018's ``{id}/masks/*.png``), united: the higher value wins where files overlap."""

    paths: tuple[Path, ...]

    def decode(self, decode_one) -> np.ndarray:
        masks = [decode_one(p) for p in self.paths]
        for p, m in zip(self.paths[1:], masks[1:]):
            if m.shape != masks[0].shape:
                raise DataError(f"{p}: mask size {m.shape[1]}x{m.shape[0]} differs from {self.paths[0].name} "
                                f"{masks[0].shape[1]}x{masks[0].shape[0]} (same image)")
        return np.maximum.reduce(masks)

    def __str__(self) -> str:
        return f"{self.paths[0].parent} ({len(self.paths)} mask files)"


def decode_raw(mask, *, colour: bool = False, grey: bool = False) -> np.ndarray:
    """A mask file's raw values (grey levels, or 0xRRGGBB colour codes; ``grey``: colour files as their
    luminance, for the binary rules), one file or several united."""
    def decode(p):
        return decode_colour_mask(p) if colour else D.decode_mask(p, to_grey=grey)

    return mask.decode(decode) if isinstance(mask, MaskUnion) else decode(mask)


def split_ignore(spec_map, ignore) -> tuple:
    """``(mask_values without its 'ignore' entries, the void keys of both)`` of a dataset file's
    ``mask_values`` and ``ignore`` (keys as written: grey levels or ``"#rrggbb"``)."""
    keys = list(ignore or [])
    if isinstance(spec_map, dict):
        keys += [r for r, c in spec_map.items() if c == "ignore"]
        spec_map = {r: c for r, c in spec_map.items() if c != "ignore"}
    return spec_map, keys


def resolve_mask_map(path: Path, items, masked, spec_map, k: int | None, folder: bool,
                     ignore=()) -> tuple[dict[int, int], int, str | None, bool, tuple[int, ...]]:
    """``(value map, number of classes, binary rule or None, colour masks?, void values)`` of a dataset's
    masks, from every labelled split's mask files (labels CSVs hold classes already; the folder form keeps
    0..K-1).  ``ignore``: raw keys of void values (``mask_values: auto`` maps the others as without them)."""
    csv_k = max((mp.table.num_classes for rows in items.values() for _, _, mp in rows if isinstance(mp, CsvMask)),
                default=None)
    spec_map, ignore = split_ignore(spec_map, ignore)
    colour = not folder and ((isinstance(spec_map, dict) and is_colour_map(spec_map))
                             or any(parse_raw(r)[1] for r in ignore))

    def collect(decode) -> dict[int, Path]:
        found: dict[int, Path] = {}
        for split, rows in items.items():
            for _, _, mp in rows if masked.get(split) else []:
                if not isinstance(mp, CsvMask):
                    for v in np.unique(decode(mp)).tolist():
                        found.setdefault(int(v), mp)
        return found

    if not colour:
        try:
            values = collect(lambda mp: decode_raw(mp, grey=spec_map in MASK_RULES))
        except D.ColourMaskError:
            if folder or spec_map != "auto":
                raise
            colour = True
    if colour:
        values = collect(lambda mp: decode_raw(mp, colour=True))
    void = tuple(sorted({v * (0x010101 if colour and not is_hex else 1) for v, is_hex in map(parse_raw, ignore)}))
    values = {v: p for v, p in values.items() if v not in void}  # void values are no class
    if csv_k is not None:
        k = k or csv_k
        if not values:  # every mask comes from a labels CSV: its values are the classes
            return {v: v for v in range(k)}, k, None, False, ()
    if folder and max(values, default=0) < MAX_LABEL_CLASSES:  # labels 0..K-1, as before dataset files
        k = folder_labels(values)
        return {v: v for v in range(k)}, k, None, False, ()
    if folder:  # grey levels (0/255, 0/85/170/255) map as auto does; anything else is a labels error
        try:
            mapping = auto_mask_map(values, None, str(path))
        except DataError:
            folder_labels(values)
            raise
        return mapping, max(mapping.values()) + 1, None, False, ()
    if spec_map in MASK_RULES and not folder:
        if k not in (None, 2):
            raise DataError(f"{path}: mask_values: {spec_map} makes a binary task, but classes has {k} names")
        rule = binary_mask(np.array(sorted(values), np.uint16 if max(values, default=0) > 255 else np.uint8), spec_map)
        if not rule.any():
            raise DataError(f"{path}: mask_values: {spec_map}: no mask has a foreground value "
                            f"(values found: {', '.join(map(str, sorted(values)[:12]))})")
        return {0: 0, 255 if max(values) <= 255 else 65535: 1}, 2, spec_map, False, void
    if isinstance(spec_map, dict) and not folder:
        parsed = [(parse_raw(r), c) for r, c in spec_map.items()]  # a grey key in a colour map is r = g = b
        spec_map = {v * (0x010101 if colour and not is_hex else 1): c for (v, is_hex), c in parsed}
        k = k or max(spec_map.values()) + 1
        if max(spec_map.values()) >= k:
            raise DataError(f"{path}: mask_values: class {max(spec_map.values())} but only {k} classes")
        for v, mp in values.items():
            if v not in spec_map:
                raise DataError(f"{mp}: mask value {hex_colour(v) if colour else v} is not in {path}'s mask_values")
        return {v: c for v, c in spec_map.items() if v not in void}, k, None, colour, void
    mapping = auto_mask_map(values, k, str(path), colour=colour)
    return mapping, k or max(mapping.values()) + 1, None, colour, void
