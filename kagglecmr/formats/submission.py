"""A competition's submission format: row ids, header, pixel order, first pixel index, classes.

:class:`SubmissionFormat` describes one CSV of ``(row id, encoding)`` rows, one row per image and
class that gets rows.  Every field has the CMR competition's value by default, so
``SubmissionFormat()`` (:data:`CMR`) writes today's files byte for byte:

``id``
    Row id template.  ``{id}`` is the image id; ``{class}`` the class index or ``{name}`` the class
    name (``class_names``, e.g. ``{id}_{name}`` -> ``0011165.jpg_Fish``).  ``"{id}"`` with no class
    gives one row per image and needs exactly one class that gets rows (a binary task).  Between
    ``{id}`` and ``{class}`` there must be literal text that does not end (or start, when the class
    comes first) with a digit, so that ``cmr12_mask3`` splits one way only.
``header``
    The two column names.
``order``
    ``column``: pixels numbered down each column first (Kaggle's usual, ``x.T.flatten()``);
    ``row``: along each row first.
``start``
    Index of the first pixel, 1 or 0.
``classes``
    Class indices that get rows, in row order; ``None`` = every class but background (1..K-1).
``class_names``
    Names of all K classes, background included (needed for ``{name}``; used in reports).

:meth:`SubmissionFormat.from_dict` builds one from a dataset file's ``submission:`` mapping and
reports every problem as a one-line :class:`~kagglecmr.utils.errors.ConfigError`.  Pure numpy; no torch.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from kagglecmr.formats.competition_metric import VOID
from kagglecmr.formats.rle import _IMAGE_ID, ORDERS, check_image_id, decode_rle, encode_rle, quoted
from kagglecmr.utils.errors import ConfigError, SubmissionError

KEYS = ("id", "header", "order", "start", "classes")
PLACEHOLDERS = ("id", "class", "name")
_LITERAL = re.compile(r"[A-Za-z0-9_.-]*", re.ASCII)  # row ids need no CSV quoting
_NAME = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)
_HEADER = re.compile(r"[^,\"\s](?:[^,\"\r\n]*[^,\"\s])?")
_CLASS_NUMBER = "0|[1-9][0-9]*"  # no leading zeros: 'mask01' is not class 1


class _Problem(ValueError):
    """A field's value is invalid: ``(key, message)``; from_dict adds the source."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _template_parts(template: str) -> list[tuple[str, str | None]]:
    """``"{id}_mask{class}"`` -> ``[("", "id"), ("_mask", "class")]`` (literal, placeholder), checked."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise _Problem("id", f"template {quoted(template)} is not valid ({exc})") from None
    parts = []
    for literal, name, spec, conversion in parsed:
        if not _LITERAL.fullmatch(literal):
            raise _Problem("id", f"template {quoted(template)}: literal text may hold only letters, digits, "
                                 "'_', '.', '-'")
        if name is not None and (name not in PLACEHOLDERS or spec or conversion):
            raise _Problem("id", f"template {quoted(template)}: unknown placeholder {{{name}}} "
                                 "(use {id} and {class} or {name})")
        parts.append((literal, name))
    names = [n for _, n in parts if n is not None]
    if names.count("id") != 1:
        raise _Problem("id", f"template {quoted(template)} must contain {{id}} exactly once")
    if len(names) > 2:
        raise _Problem("id", f"template {quoted(template)}: use {{id}} once and at most one of {{class}} or {{name}}")
    if names == ["id", "class"] or names == ["class", "id"]:
        # digits next to the class number would make 'cmr12_mask3' splittable in two ways
        sep = parts[1][0]
        edge = sep[-1:] if names[1] == "class" else sep[:1]
        if not edge or edge.isdigit():
            where = "end" if names[1] == "class" else "start"
            raise _Problem("id", f"template {quoted(template)}: put text that does not {where} with a digit "
                                 "between {id} and {class}")
    return parts


@dataclass(frozen=True)
class SubmissionFormat:
    """One competition's submission CSV (see the module docstring); the defaults are CMR's."""

    id: str = "{id}_mask{class}"
    header: tuple[str, str] = ("id", "encoding")
    order: str = "column"
    start: int = 1
    classes: tuple[int, ...] | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("header", "classes", "class_names"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        self._check(None)  # a _Problem is a ValueError
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(k) for k in self.classes))

    # ------------------------------------------------------------------ validation

    def _check(self, num_classes: int | None) -> None:
        """Raise :class:`_Problem` for the first invalid field (ranges only with ``num_classes``)."""
        if num_classes is not None and num_classes < 2:
            raise _Problem("num_classes", f"{num_classes}: need at least 2 (background and one class)")
        parts = _template_parts(self.id)
        placeholders = [n for _, n in parts if n is not None]
        if len(self.header) != 2 or not all(isinstance(h, str) and _HEADER.fullmatch(h) for h in self.header):
            raise _Problem("header", f"{list(self.header)!r}: expected two column names without commas, quotes "
                                     "or surrounding spaces")
        if self.header[0] == self.header[1]:
            raise _Problem("header", f"both columns are named {quoted(self.header[0])}")
        if self.order not in ORDERS:
            raise _Problem("order", f"{quoted(str(self.order))}: expected one of {', '.join(ORDERS)}")
        if isinstance(self.start, bool) or self.start not in (0, 1):
            raise _Problem("start", f"{self.start!r}: expected 1 or 0 (the first pixel's index)")
        names = self.class_names
        if names is not None:
            bad = [n for n in names if not isinstance(n, str) or not n]
            if bad:
                raise _Problem("class_names", f"{bad[0]!r} is not a class name")
            if len(set(names)) != len(names):
                raise _Problem("class_names", f"{list(names)}: names repeat")
            if num_classes is not None and len(names) != num_classes:
                raise _Problem("class_names", f"{len(names)} names for {num_classes} classes")
        if self.classes is not None:
            if not self.classes:
                raise _Problem("classes", "empty: at least one class must get rows")
            for k in self.classes:
                if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
                    raise _Problem("classes", f"{k!r} is not a class index")
                if num_classes is not None and k >= num_classes:
                    raise _Problem("classes", f"class {k} does not exist (classes are 0..{num_classes - 1})")
            if len(set(self.classes)) != len(self.classes):
                raise _Problem("classes", f"{list(self.classes)}: classes repeat")
        if "name" in placeholders:
            if names is None:
                raise _Problem("id", f"template {quoted(self.id)} uses {{name}} but the classes have no names")
            ks = self.classes if self.classes is not None else range(1, len(names))
            bad = [names[k] for k in ks if k < len(names) and not _NAME.fullmatch(names[k])]
            if bad:
                raise _Problem("id", f"{{name}}: class name {quoted(bad[0])} cannot be part of an id "
                                     "(use letters, digits, '_', '.', '-')")
        if placeholders == ["id"]:
            if self.classes is None:
                raise _Problem("id", f"template {quoted(self.id)} gives one row per image: set classes to the one "
                                     "class that gets rows")
            n_rows = len(self.classes)
            if n_rows != 1:
                raise _Problem("id", f"template {quoted(self.id)} gives one row per image but {n_rows} classes get "
                                     "rows (add {class} or {name}, or set classes: [k])")

    @classmethod
    def from_dict(cls, d: dict | None, *, num_classes: int, class_names=None,
                  source: str = "submission") -> SubmissionFormat:
        """Build and validate a format from a ``submission:`` mapping (``None`` = CMR defaults).

        Keys: ``id``, ``header`` (two names), ``order`` (``column``/``row``), ``start`` (1/0),
        ``classes`` (indices, or names when ``class_names`` are given).  ``class_names`` are the
        dataset's names of all ``num_classes`` classes.  Every problem is a one-line
        :class:`ConfigError` naming ``source`` and the key.
        """
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping with keys {', '.join(KEYS)}, got {type(d).__name__}")
        unknown = [k for k in d if k not in KEYS]
        if unknown:
            raise ConfigError(f"{source}: unknown key {quoted(str(unknown[0]))} (known: {', '.join(KEYS)})")
        kw: dict = {}
        try:
            if class_names is not None:
                if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
                    raise _Problem("class_names", f"{class_names!r}: expected a list of names")
                kw["class_names"] = tuple(class_names)
            if "id" in d:
                if not isinstance(d["id"], str):
                    raise _Problem("id", f"{d['id']!r}: expected a template string such as '{{id}}_mask{{class}}'")
                kw["id"] = d["id"]
            if "header" in d:
                if not isinstance(d["header"], (list, tuple)):
                    raise _Problem("header", f"{d['header']!r}: expected a list of two column names")
                kw["header"] = tuple(d["header"])
            if "order" in d:
                kw["order"] = d["order"]
            if "start" in d:
                kw["start"] = d["start"]
            if d.get("classes") is not None:
                kw["classes"] = _class_indices(d["classes"], kw.get("class_names"))
            no_class = [n for _, n in _template_parts(kw.get("id", cls.id)) if n is not None] == ["id"]
            if no_class and "classes" not in kw and isinstance(num_classes, int) and num_classes >= 2:
                if num_classes > 2:
                    raise _Problem("id", f"template {quoted(kw['id'])} gives one row per image but {num_classes - 1} "
                                         "classes get rows (add {class} or {name}, or set classes: [k])")
                kw["classes"] = (1,)  # "{id}" alone on a binary task: the foreground's row
            fmt = cls(**kw)
            fmt._check(num_classes)
        except _Problem as exc:
            raise ConfigError(f"{source}: {exc.key}: {exc.message}") from None
        return fmt

    def to_dict(self) -> dict:
        """JSON/YAML-ready mapping; ``from_dict(to_dict(), num_classes=K, class_names=...)`` gives it back.

        ``class_names`` are the dataset's, not the format's, so they are not included.
        """
        return {
            "id": self.id,
            "header": list(self.header),
            "order": self.order,
            "start": int(self.start),
            "classes": None if self.classes is None else [int(k) for k in self.classes],
        }

    # ------------------------------------------------------------------ rows

    def row_classes(self, num_classes: int) -> list[int]:
        """Class indices that get a row, in row order."""
        if self.classes is None:
            return list(range(1, num_classes))
        bad = [k for k in self.classes if k >= num_classes]
        if bad:
            raise ValueError(f"class {bad[0]} does not exist with {num_classes} classes")
        return [int(k) for k in self.classes]

    def encode(self, mask2d) -> str:
        """A binary mask as ``start length`` pairs in this format's pixel order and start ("" if empty)."""
        return encode_rle(mask2d, order=self.order, start=self.start)

    def decode(self, enc: str, shape: tuple[int, int]) -> np.ndarray:
        """Inverse of :meth:`encode`: a boolean mask of ``shape`` (strict, as :func:`~kagglecmr.formats.rle.parse_rle`)."""
        return decode_rle(enc, shape, order=self.order, start=self.start)

    @cached_property
    def _parts(self) -> list[tuple[str, str | None]]:
        return _template_parts(self.id)

    @cached_property
    def _class_field(self) -> str | None:
        return next((n for _, n in self._parts if n in ("class", "name")), None)

    def _class_text(self, k: int) -> str:
        if self._class_field == "name":
            return self.class_names[k]
        return str(k)

    def row_id(self, image_id: str, k: int) -> str:
        """The id of class ``k``'s row of ``image_id`` (``("cmr7", 2)`` -> ``"cmr7_mask2"`` for CMR)."""
        k = int(k)
        if self._class_field is None:
            if k != self.classes[0]:
                raise ValueError(f"class {k}: only class {self.classes[0]} gets rows in format {self.id!r}")
        elif self.classes is not None and k not in self.classes:
            raise ValueError(f"class {k}: rows exist only for classes {list(self.classes)}")
        elif self.classes is None and k < 1:
            raise ValueError(f"class {k}: rows exist only for foreground classes >= 1")
        elif self._class_field == "name" and k >= len(self.class_names):
            raise ValueError(f"class {k} has no name")
        check_image_id(image_id)
        values = {"id": image_id, "class": str(k)}
        if self._class_field == "name":
            values["name"] = self.class_names[k]
        return "".join(lit + ("" if n is None else values[n]) for lit, n in self._parts)

    def _pattern(self, class_regex: str) -> re.Pattern:
        groups = {"id": f"(?P<image>{_IMAGE_ID})", "class": f"(?P<k>{class_regex})", "name": f"(?P<k>{class_regex})"}
        return re.compile("".join(re.escape(lit) + ("" if n is None else groups[n]) for lit, n in self._parts),
                          re.ASCII)

    @cached_property
    def _number_pattern(self) -> re.Pattern:
        if self.classes is not None:
            return self._pattern("|".join(str(k) for k in sorted(self.classes, reverse=True)))
        return self._pattern(_CLASS_NUMBER)

    @cached_property
    def _name_patterns(self) -> list[tuple[int, re.Pattern]]:
        ks = self.classes if self.classes is not None else range(1, len(self.class_names))
        return [(k, self._pattern(re.escape(self.class_names[k]))) for k in ks]

    def describe(self) -> str:
        """The template for messages: ``<image id>_mask<class>``."""
        words = {"id": "<image id>", "class": "<class>", "name": "<class name>"}
        return "".join(lit + ("" if n is None else words[n]) for lit, n in self._parts)

    def _bad_id(self, rid: str) -> SubmissionError:
        example_k = self.classes[0] if self.classes is not None else 1
        try:
            example = self.row_id("img1", example_k)
        except ValueError:
            example = None
        return SubmissionError(f"bad id {quoted(rid)}: expected {self.describe()}"
                               + (f", e.g. {example}" if example else ""))

    def parse_row_id(self, rid: str) -> tuple[str, int]:
        """``"cmr7_mask2"`` -> ``("cmr7", 2)``; :class:`SubmissionError` for an id of any other shape.

        Ids whose image id contains ``_`` parse one way only (see the template rule on ``{class}``);
        with ``{name}``, an id that two class names could explain is an error naming both readings.
        """
        if self._class_field == "name":
            found = [(m["image"], k) for k, pat in self._name_patterns if (m := pat.fullmatch(rid))]
            if len(found) > 1:
                readings = " or ".join(f"image {quoted(i)} class {quoted(self.class_names[k])}" for i, k in found)
                raise SubmissionError(f"ambiguous id {quoted(rid)}: {readings}")
            if not found:
                raise self._bad_id(rid)
            return found[0]
        m = self._number_pattern.fullmatch(rid)
        if m is None:
            raise self._bad_id(rid)
        k = int(m["k"]) if self._class_field else self.classes[0]
        if self.classes is None and k < 1:
            raise self._bad_id(rid)
        return m["image"], k

    def rows(self, image_id: str, label_mask, num_classes: int) -> list[tuple[str, str]]:
        """The submission rows ``(id, encoding)`` of one label mask (values ``0..num_classes-1``; void pixels,
        :data:`~kagglecmr.formats.competition_metric.VOID`, are in no row)."""
        labels = np.asarray(label_mask)
        if labels.ndim != 2:
            raise ValueError(f"expected a 2-D mask, got shape {labels.shape}")
        top = labels.max() if labels.size else 0
        if top == VOID and num_classes <= VOID:
            top = labels[labels != VOID].max(initial=0)
        if labels.size and (labels.min() < 0 or top >= num_classes):
            raise ValueError(f"{image_id}: labels must lie in 0..{num_classes - 1}")
        return [(self.row_id(image_id, k), self.encode(labels == k)) for k in self.row_classes(num_classes)]

    def class_label(self, k: int) -> str:
        """``"2"`` or, with class names, ``"2 (Myo)"`` (for reports)."""
        names = self.class_names
        return f"{k} ({names[k]})" if names is not None and 0 <= k < len(names) else str(k)


def _class_indices(value, class_names: tuple[str, ...] | None) -> tuple[int, ...]:
    """``classes:`` as written (indices, or names when the classes have names) -> indices."""
    if not isinstance(value, (list, tuple)):
        raise _Problem("classes", f"{value!r}: expected a list of class indices or names")
    out = []
    for v in value:
        if isinstance(v, str):
            if class_names is None or v not in class_names:
                known = f" (known: {', '.join(class_names)})" if class_names else " (the classes have no names)"
                raise _Problem("classes", f"unknown class name {quoted(v)}{known}")
            out.append(class_names.index(v))
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        else:
            raise _Problem("classes", f"{v!r} is not a class index or name")
    return tuple(out)


CMR = SubmissionFormat()
"""The cardiac MR competition's format: ``id,encoding``, ``cmrN_maskK``, column-major, 1-based."""


# --------------------------------------------------------------------------- CMR row ids
def row_id(image_id: str, k: int) -> str:
    """``("cmr7", 2)`` -> ``"cmr7_mask2"`` (the CMR format; any format: ``SubmissionFormat.row_id``)."""
    return CMR.row_id(image_id, k)


def parse_row_id(rid: str) -> tuple[str, int]:
    """``"cmr7_mask2"`` -> ``("cmr7", 2)``; raises :class:`SubmissionError` for any other shape."""
    return CMR.parse_row_id(rid)


def label_to_rows(image_id: str, label_mask, num_classes: int = 4) -> list[tuple[str, str]]:
    """The ``num_classes - 1`` CMR submission rows ``(id, encoding)`` of one label mask."""
    return CMR.rows(image_id, label_mask, num_classes)
