"""Datasets: a folder in the competition layout or a YAML dataset file, resolved once.

``--data`` takes either a folder (``train/image/cmrN.png`` + ``train/mask/cmrN_mask.png``, optional
``val/`` and ``test/``; a ``dataset.yaml`` inside it wins) or a dataset file::

    name: warwick
    root: ../../../shared/data/warwick   # relative to this file
    classes: [background, gland]         # count = number of classes
    splits:                              # train required; val and test optional
      train: {image: "Train/image_{id}.png", mask: "Train/label_{id}.png"}
      test:  {image: "Test/image_{id}.png", mask: "Test/label_{id}.png"}
    mask_values: auto                    # or {0: 0, 255: 1} (also merges labels), or threshold / nonzero (binary)
    channels: auto                       # or [0, 1] (RGB order)
    size: auto                           # or 128 or [H, W]
    group: null                          # or a regex whose first group, applied to the id, names a group
    submission: {id: "{id}_mask{class}", header: [id, encoding], order: column, start: 1, classes: [1, 2, 3]}
    recipe: null                         # experiment config `train` uses without --config
    labels: null                         # a split's mask may be a run-length CSV (kagglecmr.data.labels_csv)
    ignore: null                         # or [11]: raw mask values meaning void (decoded as VOID = 255)
    metric: null                         # or {name: iou, per: dataset} (kagglecmr.formats.competition_metric)
    task: softmax                        # or multilabel: overlapping classes, one file per class (data.multilabel)

:func:`load_dataset` lists every split's files, reads the training masks (value map, classes) and
images (channels, sizes) and fails early with a one-line :class:`DataError` naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kagglecmr.data import loader as D
from kagglecmr.data.cache import cache_root, load_split
from kagglecmr.data.channels import channel_rule, resolve_channels, to_channels  # noqa: F401 (re-exported)
from kagglecmr.data.dataset_file import DatasetFile, SplitPatterns, file_items, read_dataset_file
from kagglecmr.data.labels_csv import CsvMask
from kagglecmr.data.loader import Split
from kagglecmr.data.mask_folder import mask_folder_paths
from kagglecmr.data.mask_values import (  # noqa: F401 (auto_mask_map, class_to_raw: re-exported)
    LabelGapError,
    auto_mask_map,
    binary_mask,
    class_to_raw,
    decode_raw,
    hex_colour,
    labels_to_raw,
    map_values,
    resolve_mask_map,
)
from kagglecmr.data.multilabel import ClassFiles, read_class_files, read_class_folder, resolve_class_map
from kagglecmr.formats.competition_metric import VOID, Metric
from kagglecmr.formats.multilabel import MultilabelFormat, label_names
from kagglecmr.formats.submission import SubmissionFormat
from kagglecmr.utils.errors import ConfigError, DataError

DATASET_FILE = "dataset.yaml"
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Dataset:
    """A resolved dataset: its files, classes, channels, model size, mask value map and submission format."""

    name: str
    path: Path  # the dataset file, or the folder of the folder form
    root: Path
    classes: list[str]
    mask_values: dict[int, int]
    channels: list[int]  # kept channels of the source space (kagglecmr.data.channels)
    source_channels: int  # the space every image is brought into: grey 1, grey+alpha 2, RGB 3, RGBA 4
    size: tuple[int, int]
    submission: Any = None  # kagglecmr.formats.submission.SubmissionFormat (the CMR format by default)
    group: str | None = None
    recipe: str | None = None
    folder: bool = False
    resized: bool = False
    size_error: str | None = None  # images differ in size and nothing says which to use (yet)
    mask_rule: str | None = None  # nonzero | threshold: binary masks by a rule instead of the value map
    colour: bool = False  # colour-coded masks: mask_values keys are 0xRRGGBB colours
    label_error: str | None = None  # folder form: mask values not 0..K-1 (a pinned data.num_classes may allow them)
    ignore: tuple[int, ...] = ()  # raw mask values meaning void: decoded as VOID, left out of losses and metrics
    metric: Metric = field(default_factory=Metric)  # the competition's metric, bound to the submission's row classes
    _label_top: int = field(default=0, repr=False)  # the largest mask value found, with label_error
    task: str = "softmax"  # multilabel: classes overlap, masks are packed bits (kagglecmr.formats.multilabel)
    notes: list[str] = field(default_factory=list)
    _items: dict[str, list] = field(default_factory=dict, repr=False)
    _masked: dict[str, bool] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return len(self.channels)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    @property
    def label_names(self) -> list[str]:
        """The names class numbers index: ``classes``, or with ``task: multilabel`` ``[NO_CLASS, *classes]``
        (its classes number 1..K, as a softmax task's foreground classes)."""
        return label_names(self.classes) if self.multilabel else list(self.classes)

    def split_names(self) -> list[str]:
        return [s for s in SPLIT_NAMES if s in self._items]

    def has_masks(self, split: str) -> bool:
        return self._masked.get(split, False)

    def items(self, split: str) -> list[tuple[str, Path, Path | None]]:
        if split not in self._items:
            raise DataError(f"{self.path}: no split '{split}' (has {', '.join(self.split_names())})")
        return self._items[split]

    # ---------------------------------------------------------------------------- decoding
    def read_image(self, path: Path, *, resize: bool = True) -> np.ndarray:
        img = to_channels(D.decode_image(path), self.channels, self.source_channels, str(path))
        return D.resize_to(img, self.size, nearest=False) if resize else img

    def read_mask(self, path: Path, *, resize: bool = True) -> np.ndarray:
        m = self._labels(path)
        return D.resize_to(m, self.size, nearest=True) if resize else m

    def _labels(self, path) -> np.ndarray:
        """Class labels of one mask at its own size: from a labels CSV, by the binary rule or by the value map."""
        if isinstance(path, CsvMask):
            return path.decode()
        if isinstance(path, ClassFiles):  # task multilabel: one binary file per class -> packed bits
            return read_class_files(path, self.mask_values, self.mask_rule, str(self.path))
        raw = decode_raw(path, colour=self.colour, grey=self.mask_rule is not None)
        if self.mask_rule:
            m = binary_mask(raw, self.mask_rule)
            if self.ignore:
                m[np.isin(raw, self.ignore)] = VOID
            return m
        return map_values(raw, self.mask_values | dict.fromkeys(self.ignore, VOID), str(path), str(self.path))

    def read_mask_folder(self, folder) -> dict[str, np.ndarray]:
        """``{image id: label map}`` of a folder of masks in the dataset's values (``<id>_mask.png`` or ``<id>.png``;
        with ``task: multilabel`` ``<class>/<id>.png``), at their own sizes."""
        if self.multilabel:
            return read_class_folder(folder, self.classes, self.mask_values, self.mask_rule, str(self.path))
        return {i: self.read_mask(p, resize=False) for i, p in mask_folder_paths(folder).items()}

    def to_raw(self, label_mask: np.ndarray) -> np.ndarray:
        """Class labels -> the dataset's own mask values (the first raw value of each class)."""
        return labels_to_raw(label_mask, self.raw_values(), self.num_classes)

    def raw_values(self) -> dict:
        """``mask_values`` as written in ``dataset.json``: ``{"255": 1}`` or ``{"#ff0000": 1}``."""
        return {hex_colour(v) if self.colour else str(v): k for v, k in sorted(self.mask_values.items())}

    def load(self, split: str, labelled: bool | None = None) -> Split:
        """Decode a split at the model size (masks when it has them, or as ``labelled`` says)."""
        if self.size_error:
            raise DataError(self.size_error)
        items = self.items(split)
        use_masks = self.has_masks(split) if labelled is None else labelled
        if use_masks and not self.has_masks(split):
            raise DataError(f"{self.path}: split '{split}' has no masks")
        if use_masks and self.label_error:
            raise DataError(self.label_error)
        if cache_root() is not None:  # decoded once into arrays on disk, read lazily (kagglecmr.data.cache)
            return load_split(self, split, use_masks, self._finish)
        ids, images, masks, sizes = [], [], [], []
        for i, ip, mp in items:
            img = self.read_image(ip, resize=False)
            sizes.append(tuple(img.shape[:2]))
            im, m = self._finish(img, self.read_mask(mp, resize=False) if use_masks else None, ip, mp)
            ids.append(i)
            images.append(im)
            if use_masks:
                masks.append(m)
        return Split(ids=ids, images=np.stack(images), masks=np.stack(masks) if use_masks else None,
                     splits=[split] * len(ids), image_paths=[ip for _, ip, _ in items], orig_sizes=sizes)

    def _finish(self, img: np.ndarray, m: np.ndarray | None, ip, mp) -> tuple[np.ndarray, np.ndarray | None]:
        """One decoded image (and mask) at its own size -> both at the model size."""
        if m is not None and m.shape != img.shape[:2]:
            raise DataError(f"{mp}: mask size {m.shape[1]}x{m.shape[0]} differs from its image "
                            f"{img.shape[1]}x{img.shape[0]}")
        return (D.resize_to(img, self.size, nearest=False),
                None if m is None else D.resize_to(m, self.size, nearest=True))

    def labelled(self) -> Split:
        parts = [self.load(s, labelled=True) for s in ("train", "val") if self.has_masks(s)]
        if not parts:
            raise DataError(_no_labels(self.root)
                            if self.folder else f"{self.path}: no labelled split (train needs a mask pattern)")
        return D.concat(parts)

    def groups(self, ids: list[str]) -> list[str]:
        """The ``group`` regex's first group of each id."""
        rx = re.compile(self.group)
        out = []
        for i in ids:
            m = rx.search(i)
            if m is None or m.group(1) is None:
                raise DataError(f"{self.path}: group regex {self.group!r} does not match id '{i}'")
            out.append(m.group(1))
        return out

    def describe(self) -> dict:
        return {
            "name": self.name, "path": str(self.path), "root": str(self.root), "form": "folder" if self.folder else "file",
            "classes": list(self.classes), "num_classes": self.num_classes,
            "source_channels": self.source_channels, "channels": list(self.channels), "in_channels": self.in_channels,
            "dropped_channels": [c for c in range(self.source_channels) if c not in self.channels],
            "size": list(self.size) if self.size else None, "resized": self.resized,
            "mask_values": self.raw_values(), "mask_rule": self.mask_rule,
            "ignore": [hex_colour(v) if self.colour else v for v in self.ignore], "metric": self.metric.to_dict(),
            "submission": self.submission.to_dict(), "group": self.group, "recipe": self.recipe, "notes": list(self.notes),
            "splits": {s: {"images": len(self._items[s]), "masks": self.has_masks(s)} for s in self.split_names()},
        } | ({"task": self.task} if self.multilabel else {})


# ---------------------------------------------------------------------------------- loading
def _folder_items(root: Path) -> tuple[dict, dict]:
    items, masked = {}, {}
    for split in D.available_splits(root):
        mdir = root / split / "mask"
        masked[split] = mdir.is_dir() and any(mdir.iterdir())
        items[split] = D.discover(root, split, labelled=masked[split] if split != "test" else None)
    return items, masked


def _submission_format(d: dict | None, num_classes: int, names: list[str], source: str, *, multilabel: bool = False):
    if multilabel:  # rows for classes 1..K of packed maps (kagglecmr.formats.multilabel)
        try:
            return MultilabelFormat.from_dict(d, num_classes=num_classes + 1, class_names=label_names(names),
                                              source=source)
        except ConfigError as exc:
            raise DataError(str(exc)) from None
    try:
        return SubmissionFormat.from_dict(d, num_classes=num_classes, class_names=names, source=source)
    except ConfigError as exc:
        raise DataError(str(exc)) from None


def _no_labels(root: Path) -> str:
    """The folder form without labelled images: say which folder is missing."""
    if (root / "train" / "image").is_dir():
        return f"{root}: no labelled split (train/image has no masks beside it in {root / 'train' / 'mask'})"
    return f"{root}: no labelled split (expected {root / 'train' / 'image'})"


def load_dataset(data: str | Path) -> Dataset:
    """A folder in today's layout (or with a ``dataset.yaml`` inside) or a ``.yaml/.yml`` dataset file."""
    path = Path(data)
    if path.is_dir() and (path / DATASET_FILE).is_file():
        path = path / DATASET_FILE
    if path.is_dir():
        return _resolve(path, path, DatasetFile(splits={"train": SplitPatterns(image="x{id}")}), folder=True)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise DataError(f"{path}: dataset not found (expected a folder with train/ inside or a .yaml dataset file)")
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    spec = read_dataset_file(path)
    root = (path.parent / spec.root).resolve() if not Path(spec.root).is_absolute() else Path(spec.root)
    if not root.is_dir():
        raise DataError(f"{path}: root: folder {root} not found")
    return _resolve(path, root, spec, folder=False)


def _resolve(path: Path, root: Path, spec: DatasetFile, *, folder: bool) -> Dataset:
    items, masked = _folder_items(root) if folder else file_items(path, root, spec)
    if folder and not any(masked.get(s) for s in ("train", "val")):
        raise DataError(_no_labels(root))
    labelled = [ip for s in ("train", "val") if masked.get(s) for _, ip, _ in items[s]] or \
        [ip for _, ip, _ in items["train"]]
    shapes: dict[Path, tuple[int, int]] = {}

    def decoded():  # one image at a time: what resolve_channels keeps of each is a few numbers
        for p in labelled:
            img = D.decode_image(p)
            shapes[p] = img.shape[:2]
            yield p, img

    source, channels, notes = resolve_channels(path, decoded(), spec.channels)
    try:
        size, resized, size_error = *D.common_size(path, items, shapes, spec.size), None
    except DataError as exc:  # the folder form may still be resized by a config (data.size + data.resize)
        if not folder:
            raise
        size, resized, size_error = None, False, str(exc).replace("set size:", "set data.size and data.resize: true")
    k = len(spec.classes) if spec.classes else None
    label_error, top = None, 0
    if spec.task == "multilabel":
        if spec.ignore:
            raise DataError(f"{path}: ignore: void labels are not supported with task: multilabel yet")
        (mapping, rule), colour, void = resolve_class_map(path, items, masked, spec.mask_values), False, ()
    else:
        try:
            mapping, k, rule, colour, void = resolve_mask_map(path, items, masked, spec.mask_values, k, folder, spec.ignore)
        except LabelGapError as exc:  # raised by load() and apply_dataset() unless data.num_classes allows the values
            mapping, k, rule, colour, void = {v: v for v in range(exc.k)}, exc.k, None, False, ()
            label_error, top = str(exc), exc.top
    if void and k > VOID:
        raise DataError(f"{path}: ignore: void pixels need fewer than {VOID} classes ({k} found)")
    names = list(spec.classes) if spec.classes else ["background"] + [f"class{c}" for c in range(1, k)]
    ds = Dataset(name=spec.name or (path.name if folder else path.stem), path=path, root=root, classes=names,
                 mask_values=mapping, channels=channels, source_channels=source, size=size,
                 group=spec.group, recipe=spec.recipe, folder=folder, resized=resized, size_error=size_error, notes=notes,
                 mask_rule=rule, colour=colour, label_error=label_error, _label_top=top, _items=items,
                 _masked=masked, ignore=void, task=spec.task)
    ds.submission = _submission_format(spec.submission, k, names, str(path), multilabel=ds.multilabel)
    ds.metric = Metric.from_dict(spec.metric, str(path)).for_classes(ds.submission.row_classes(k))  # checked on read
    return ds


def described_metric(desc: dict | None) -> Metric:
    """The metric of a run's recorded dataset (``dataset.json``, :meth:`Dataset.describe`) bound to its row
    classes; runs recorded before ``metric`` existed (or without a description) score with Dice."""
    if not desc:
        return Metric()
    metric = Metric.from_dict(desc.get("metric"), "dataset.json")
    try:
        k = int(desc["num_classes"])
        fmt = SubmissionFormat.from_dict(desc.get("submission"), num_classes=k, class_names=desc.get("classes"))
        return metric.for_classes(fmt.row_classes(k))
    except (KeyError, TypeError, ValueError, ConfigError):
        return metric


# ------------------------------------------------------------------------- config and recipe
def apply_dataset(cfg, ds: Dataset):
    """``cfg`` with ``data.size / in_channels / num_classes`` filled from ``ds``; a pinned value that
    conflicts is a one-line ConfigError.  (The folder form takes a larger pinned class count, which also
    accepts mask values with a gap below it, and
    ``data.resize: true`` with a pinned size resizes to it.)"""
    d = cfg.data
    where = f"config {cfg.name or '<defaults>'}"
    if d.task is not None and d.task != ds.task:
        raise ConfigError(f"{where}: data.task={d.task} conflicts with {ds.path} (task {ds.task})")
    if d.num_classes is not None and d.num_classes != ds.num_classes:
        if not (ds.folder and d.num_classes > ds.num_classes):
            raise ConfigError(f"{where}: data.num_classes={d.num_classes} conflicts with {ds.path} "
                              f"({ds.num_classes} classes)")
        ds.classes = ds.classes + [f"class{c}" for c in range(ds.num_classes, d.num_classes)]
        ds.mask_values = {v: v for v in range(d.num_classes)}
        ds.submission = _submission_format(None, d.num_classes, ds.classes, str(ds.path))
    if ds.label_error:
        if d.num_classes is None or d.num_classes <= ds._label_top:
            raise DataError(ds.label_error)
        ds.label_error = None  # the pinned class count takes the values found
    if d.in_channels is not None and d.in_channels != ds.in_channels:
        raise ConfigError(f"{where}: data.in_channels={d.in_channels} conflicts with {ds.path} "
                          f"({ds.in_channels} channel(s) {ds.channels})")
    if d.size is not None and d.hw != ds.size:
        if not d.resize and ds.size_error:
            raise DataError(ds.size_error)
        if not d.resize:
            raise ConfigError(f"{where}: data.size={d.size} conflicts with {ds.path} (images are "
                              f"{ds.size[1]}x{ds.size[0]}; set size: in the dataset, or data.resize: true)")
        ds.size, ds.resized, ds.size_error = d.hw, True, None
    if ds.size_error:
        raise DataError(ds.size_error)
    out = cfg.model_copy(deep=True)
    h, w = ds.size
    out.data.size = h if h == w else [h, w]
    if ds.multilabel:  # before num_classes: one class is a valid multilabel task
        out.data.task = ds.task
    out.data.in_channels, out.data.num_classes = ds.in_channels, ds.num_classes
    cw = out.loss.class_weights
    if cw is not None and len(cw) != ds.num_classes:
        raise ConfigError(f"{where}: loss.class_weights has {len(cw)} values, {ds.path} has {ds.num_classes} classes")
    return out


def recipe_for(data: str | Path) -> str:
    """The experiment config ``train`` uses without ``--config``: the dataset file's ``recipe`` (a shipped
    name, or a path relative to the dataset file), else ``default``."""
    path = Path(data)
    if path.is_dir() and (path / DATASET_FILE).is_file():
        path = path / DATASET_FILE
    if not path.is_file():
        return "default"
    recipe = read_dataset_file(path).recipe
    if not recipe:
        return "default"
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.parent != Path("."):
        return str(p if p.is_absolute() else path.parent / p)
    return recipe


def dataset_task(data: str | Path) -> str:
    """``softmax`` or ``multilabel``: the ``task`` of ``data``'s dataset file (read alone, no image decoded)."""
    path = Path(data)
    if path.is_dir() and (path / DATASET_FILE).is_file():
        path = path / DATASET_FILE
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return read_dataset_file(path).task
    return "softmax"


def prepare(cfg, data: str | Path, *, quiet: bool = False):
    """``(resolved cfg, dataset, labelled split)`` for training and fold making."""
    ds = load_dataset(data)
    cfg = apply_dataset(cfg, ds) if cfg is not None else None
    if not quiet:
        for note in ds.notes:
            print(note, flush=True)
    return cfg, ds, ds.labelled()
