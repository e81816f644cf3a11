"""The dataset file's schema (pydantic) and its file patterns: ``{id}`` matches one file-name part.

A file pattern is a path relative to the dataset's ``root`` with ``{id}`` (one file-name part, the same
wherever it repeats: ``{id}/images/{id}.png``; ``*`` matches any characters within one name).  A ``*`` in
a mask pattern unites the files it matches for one image (:class:`~kagglecmr.data.mask_values.MaskUnion`); a
mask "pattern" without ``{id}`` ending in ``.csv`` is a run-length labels CSV (:mod:`kagglecmr.data.labels_csv`).  Images and masks may share a folder (``Img/{id}.png`` + ``Img/{id}_mask.png``):
a file matching both patterns belongs to the more specific one.  Images without masks, masks without
images and ids matching twice are one-line :class:`DataError` messages naming the file.

``task: multilabel`` (overlapping classes; :mod:`kagglecmr.data.multilabel`): ``classes`` lists the foreground
classes only, and a mask pattern holds ``{name}`` (the class name) or ``{class}`` (its number 1..K) besides
``{id}``: one binary file per image and class (``GT/{name}/{id}_{name}.tif``).  A missing file is an empty
class, or with ``missing: error`` a one-line error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kagglecmr.data.labels_csv import CsvLabels, CsvMask, is_csv_pattern
from kagglecmr.data.mask_values import MaskUnion, parse_raw
from kagglecmr.data.multilabel import class_masks, class_pattern, class_pattern_field
from kagglecmr.formats.competition_metric import Metric
from kagglecmr.formats.multilabel import MAX_CLASSES, label_names
from kagglecmr.utils.errors import ConfigError, DataError
from kagglecmr.utils.naming import natural_sorted


class SplitPatterns(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str
    mask: str | None = None


class DatasetFile(BaseModel):
    """The schema of a dataset YAML file (every key but ``splits`` optional)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    root: str = "."
    classes: list[str] | None = Field(None, min_length=1)
    task: Literal["softmax", "multilabel"] = Field(
        "softmax", description="`softmax`: each pixel is one class (background first in `classes`); `multilabel`: "
        "classes overlap, one sigmoid each; `classes` lists only them and masks come one file per class; see "
        "[Overlapping classes](#overlapping-classes-task-multilabel).")
    missing: Literal["empty", "error"] = Field(
        "empty", description="Task multilabel: an image without a class's mask file has that class empty, or "
        "(`error`) is an error naming the file.")
    splits: dict[Literal["train", "val", "test"], SplitPatterns]
    mask_values: Literal["auto", "nonzero", "threshold"] | dict[int | str, int | Literal["ignore"]] = "auto"
    channels: Literal["auto"] | list[int] = "auto"
    size: Literal["auto"] | int | tuple[int, int] = "auto"
    group: str | None = None
    submission: dict[str, Any] | None = None
    labels: dict[str, Any] | None = None  # how a split's labels CSV is read (kagglecmr.data.labels_csv)
    recipe: str | None = None
    ignore: list[int | str] | None = Field(
        None, description="Raw mask values meaning \"not labelled\" (void), e.g. `[11]` or `[\"#000000\"]`: left out of "
                          "every loss, metric, fold statistic and tuning; see [Void labels](#void-labels).")
    metric: dict[str, Any] | str | None = Field(
        None, description="The competition's metric, e.g. `{name: iou, per: dataset}`; default `{name: dice, per: row, "
                          "empty: 1}`; see [Metric](#metric).")

    @field_validator("splits")
    @classmethod
    def _train(cls, v):
        if "train" not in v:
            raise ValueError("needs a 'train' split")
        for name, s in v.items():
            for kind, pat in (("image", s.image), ("mask", s.mask)):
                if kind == "mask" and is_csv_pattern(pat):
                    continue  # masks from a run-length CSV (a path relative to root, or absolute)
                known = "id|name|class" if kind == "mask" else "id"  # {name}, {class}: checked against task below
                if pat is not None and (pat.count("{id}") < 1 or re.search(r"\{(?!(" + known + r")\})", pat)
                                        or pat.startswith("/") or "\\" in pat):
                    raise ValueError(f"{name}.{kind}: pattern {pat!r} must be a relative path with {{id}}"
                                     + (" (or a labels .csv file)" if kind == "mask" else ""))
        return v

    @model_validator(mode="after")
    def _task(self):
        per_class = {name: class_pattern_field(s.mask) for name, s in self.splits.items()
                     if s.mask is not None and not is_csv_pattern(s.mask)}
        if self.task == "softmax":
            if self.classes is not None and len(self.classes) < 2:
                raise ValueError(f"classes: List should have at least 2 items after validation, not {len(self.classes)}")
            for name, f in per_class.items():
                if f:
                    raise ValueError(f"splits.{name}.mask: {f} names one file per class: set task: multilabel")
            return self
        if not self.classes:
            raise ValueError("classes: task multilabel needs the list of its (foreground) classes")
        if len(self.classes) > MAX_CLASSES:
            raise ValueError(f"classes: task multilabel holds at most {MAX_CLASSES} classes (found {len(self.classes)})")
        for name, f in per_class.items():
            if not f:
                raise ValueError(f"splits.{name}.mask: task multilabel reads one file per class: put {{name}} or "
                                 "{class} in the pattern, e.g. masks/{name}/{id}.png (or give a labels .csv)")
        return self

    @field_validator("channels")
    @classmethod
    def _channels(cls, v):
        if v != "auto" and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("must be auto or a list of distinct channel indices (0 = red)")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if v != "auto" and min((v, v) if isinstance(v, int) else v) < 8:
            raise ValueError("must be auto, a side >= 8 or [H, W]")
        return v

    @field_validator("group")
    @classmethod
    def _group(cls, v):
        if v is not None:
            try:
                if re.compile(v).groups < 1:
                    raise ValueError("regex needs a capturing group, e.g. '(patient\\d+)_'")
            except re.error as exc:
                raise ValueError(f"not a valid regex ({exc})") from None
        return v

    @field_validator("mask_values")
    @classmethod
    def _map(cls, v):
        if isinstance(v, dict):
            classes = [c for c in v.values() if c != "ignore"]
            if not classes or min(classes) < 0:
                raise ValueError("must be auto, nonzero, threshold or a map {raw value: class} of non-negative "
                                 "integers (colours as '#rrggbb'; 'ignore' for void values)")
            for key in v:
                parse_raw(key)  # a ValueError names the key
        return v


    @field_validator("metric")
    @classmethod
    def _metric(cls, v):
        try:
            Metric.from_dict(v, "")
        except ConfigError as exc:  # ": metric.name: ..." -> "name: ..." (the key is named by the caller)
            raise ValueError(str(exc).split(": metric", 1)[-1].lstrip(".: ")) from None
        return v

    @field_validator("ignore")
    @classmethod
    def _ignore(cls, v):
        for key in v or []:
            parse_raw(key)  # a ValueError names the value
        return v


def _pattern_regex(pattern: str) -> re.Pattern:
    """``{id}`` is one file-name part, the same wherever it appears (``{id}/images/{id}.png``)."""
    head, *rest = pattern.split("{id}")
    esc = lambda s: re.escape(s).replace(r"\*", "[^/]*")  # noqa: E731
    return re.compile(esc(head) + r"(?P<id>[^/]+?)" + "".join(("" if k == 0 else "(?P=id)") + esc(t)
                                                             for k, t in enumerate(rest)))


def _literal_len(pattern: str) -> int:
    return len(pattern.replace("{id}", "").replace("*", ""))


def _match(root: Path, pattern: str, other: str | None, *, unite: bool = False) -> dict[str, Path]:
    """``{id: path}`` of the files under ``root`` matching ``pattern`` (a file that also matches the more
    specific ``other`` pattern belongs to that one); an id matching twice is an error, unless ``unite``
    (masks): then its files become one :class:`MaskUnion`."""
    rx, orx = _pattern_regex(pattern), _pattern_regex(other) if other else None
    found: dict[str, Path] = {}
    several: dict[str, list[Path]] = {}
    for p in sorted(root.glob(pattern.replace("{id}", "*"))):
        rel = p.relative_to(root).as_posix()
        m = rx.fullmatch(rel)
        if not m or not p.is_file() or p.name.startswith("."):
            continue
        if orx is not None and orx.fullmatch(rel) and _literal_len(other) > _literal_len(pattern):
            continue
        i = m.group("id")
        if i in found and unite:
            several.setdefault(i, [found[i]]).append(p)
            continue
        if i in found:
            raise DataError(f"{p}: id '{i}' matches '{pattern}' twice (also {found[i]})")
        found[i] = p
    return found | {i: MaskUnion(tuple(ps)) for i, ps in several.items()}


def read_dataset_file(path: Path) -> DatasetFile:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise DataError(f"{path}:{f' line {line + 1}' if line is not None else ''} not valid YAML") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read dataset file ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a dataset file is a mapping with at least 'splits'")
    try:
        return DatasetFile.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("literal[", "dict[", "tuple[", "int"))) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        raise DataError(f"{path}: {'' if key == '<root>' else key + ': '}{msg}") from None


def file_items(path: Path, root: Path, spec: DatasetFile) -> tuple[dict, dict]:
    items, masked, tables, known = {}, {}, {}, {}
    for split, pats in spec.splits.items():
        csv_masks = is_csv_pattern(pats.mask)
        images = _match(root, pats.image, None if csv_masks else pats.mask)
        if class_pattern_field(pats.mask) and not csv_masks and spec.classes:  # beside the class files: not images
            for c, name in enumerate(spec.classes, start=1):
                images = {i: p for i, p in _match(root, pats.image, class_pattern(pats.mask, c, name)).items()
                          if i in images}
        if not images:
            raise DataError(f"{path}: splits.{split}.image: no file matches {root / pats.image}")
        if csv_masks:
            csv_path = root / pats.mask
            if not csv_path.is_file():
                raise DataError(f"{path}: splits.{split}.mask: labels CSV {csv_path} not found")
            if csv_path not in tables:
                ml = spec.task == "multilabel"
                tables[csv_path] = CsvLabels(csv_path, spec.labels, spec.submission,
                                             label_names(spec.classes) if ml else spec.classes, str(path), multilabel=ml)
            known.setdefault(csv_path, set()).update(images)
            masks = {i: CsvMask(tables[csv_path], i, p) for i, p in images.items()}
        elif spec.task == "multilabel" and pats.mask:
            masks = class_masks(pats.mask, spec.classes, images,
                                lambda pat, image=pats.image: _match(root, pat, image, unite="*" in pat),
                                root=root, missing=spec.missing, where=f"{path}: splits.{split}.mask")
        else:
            masks = _match(root, pats.mask, pats.image, unite="*" in pats.mask) if pats.mask else {}
        if pats.mask and not csv_masks:
            for i, p in images.items():
                if i not in masks:
                    raise DataError(f"{p}: image has no mask ({root / pats.mask.replace('{id}', i)} missing)")
            for i, p in masks.items():
                if i not in images:
                    raise DataError(f"{p}: mask has no image ({root / pats.image.replace('{id}', i)} missing)")
        items[split] = [(i, images[i], masks.get(i)) for i in natural_sorted(images)]
        masked[split] = bool(pats.mask)
    for csv_path, table in tables.items():
        table.check_ids(known[csv_path])
    if spec.labels is not None and not tables:
        raise DataError(f"{path}: labels: describes a labels CSV, but no split's mask is a .csv file")
    return items, masked


