"""Image and mask decoding primitives and folder discovery, the ground the dataset loader stands on.

:mod:`kagglecmr.data.dataset` (``load_dataset``) reads every ``--data``; it builds on what is here:
:func:`discover` / :func:`available_splits` list the competition folder layout (``train/``, optional
``val/`` and ``test/``, each with ``image/`` and, when labelled, ``mask/``; the mask of ``image/cmrN.png``
is ``mask/cmrN_mask.png``), :func:`decode_image` / :func:`decode_mask` / :func:`png_size` /
:func:`image_size` / :func:`resize_to` decode and size files, :class:`Split` holds decoded uint8 arrays
(images ``[N, H, W, C]``, masks ``[N, H, W]``) and :func:`concat` joins splits.  :func:`read_image` /
:func:`read_mask` decode one file to a :class:`~kagglecmr.cfg.config.DataSpec` (pseudo-label and mask
folders).

Every problem is a :class:`~kagglecmr.utils.errors.DataError` whose one-line message names the file.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from kagglecmr.cfg.config import DataSpec
from kagglecmr.data import rows
from kagglecmr.data.image_formats import TIFF_SUFFIXES, check_pixels, header_size, is_tiff, read_tiff, to_uint8
from kagglecmr.utils.errors import DataError
from kagglecmr.utils.naming import natural_sorted

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", *TIFF_SUFFIXES, ".jpg", ".jpeg")  # what the folder layout and predict take as images
MASK_SUFFIXES = (".png", *TIFF_SUFFIXES)  # ... and as masks (lossless only)
MASK_SUFFIX = "_mask"


@dataclass
class Split:
    """Decoded images (and masks) of one or more splits, in natural id order."""

    ids: list[str]
    images: np.ndarray  # uint8 [N, H, W, C] (or the cache's LazyRows: read on indexing)
    masks: np.ndarray | None  # uint8 [N, H, W] with values < num_classes, or None (unlabelled)
    splits: list[str] = field(default_factory=list)  # split name of each image
    image_paths: list[Path] = field(default_factory=list)
    orig_sizes: list[tuple[int, int]] = field(default_factory=list)  # (H, W) of each image on disk

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, ids) -> np.ndarray:
        pos = {i: k for k, i in enumerate(self.ids)}
        return np.array([pos[i] for i in ids], dtype=np.int64)

    def subset(self, ids) -> Split:
        idx = self.index(ids)
        return Split(
            ids=[self.ids[k] for k in idx],
            images=rows.take(self.images, idx),  # lazy rows of the cache stay on disk
            masks=None if self.masks is None else rows.take(self.masks, idx),
            splits=[self.splits[k] for k in idx] if self.splits else [],
            image_paths=[self.image_paths[k] for k in idx] if self.image_paths else [],
            orig_sizes=[self.orig_sizes[k] for k in idx] if self.orig_sizes else [],
        )

    def sizes(self) -> list[tuple[int, int]]:
        """``(H, W)`` of each image on disk (the array size when unknown)."""
        return list(self.orig_sizes) if self.orig_sizes else [tuple(self.images.shape[1:3])] * len(self.ids)


def mask_id(path: Path) -> str:
    """``cmr7_mask.png`` -> ``cmr7``; a mask named like its image (``cmr7.png``) -> ``cmr7``."""
    stem = Path(path).stem
    return stem[: -len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) else stem


def _files(folder: Path, suffixes=IMAGE_SUFFIXES) -> dict[str, Path]:
    """``{stem: path}`` of the image files in ``folder``; two files of one stem (``a.png``, ``a.tif``) are an error."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."):
            if p.stem in found:
                raise DataError(f"{p}: same name as {found[p.stem].name} (one file per image)")
            found[p.stem] = p
    return found


def _folder(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (expected train/, val/, test/ inside)")
    return root


def available_splits(root: str | Path) -> list[str]:
    root = _folder(root)
    return [s for s in SPLITS if (root / s / "image").is_dir()]


def discover(root: str | Path, split: str, *, labelled: bool | None = None) -> list[tuple[str, Path, Path | None]]:
    """List ``(id, image_path, mask_path)`` of a split in natural order.

    ``labelled=None`` means: masks are used when the split has a ``mask/`` folder.  Images
    without masks and masks without images are errors in a labelled split.
    """
    root = _folder(root)
    image_dir = root / split / "image"
    mask_dir = root / split / "mask"
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: folder not found")
    if labelled is None:
        labelled = mask_dir.is_dir() and any(mask_dir.iterdir())
    images = _files(image_dir)
    if not images:
        raise DataError(f"{image_dir}: no PNG images in split '{split}' (nor TIFF or JPEG)")
    masks: dict[str, Path] = {}
    if labelled:
        if not mask_dir.is_dir():
            raise DataError(f"{mask_dir}: folder not found (split '{split}' needs masks)")
        for p in _files(mask_dir, MASK_SUFFIXES).values():
            if mask_id(p) in masks:
                raise DataError(f"{p}: a second mask of image '{mask_id(p)}' ({masks[mask_id(p)].name})")
            masks[mask_id(p)] = p
        for i, p in natural_sorted(images.items(), key=lambda kv: kv[0]):
            if i not in masks:
                raise DataError(f"{p}: image has no mask ({mask_dir / (i + MASK_SUFFIX + '.png')} missing)")
        for i, p in natural_sorted(masks.items(), key=lambda kv: kv[0]):
            if i not in images:
                raise DataError(f"{p}: mask has no image ({image_dir / (i + '.png')} missing)")
    return [(i, images[i], masks.get(i)) for i in natural_sorted(images)]


def imread(path: Path, flags: int) -> np.ndarray:
    """Decode an image file as OpenCV does (colour in BGR(A) order, pixel type as stored); TIFF through
    tifffile (:mod:`kagglecmr.data.image_formats`)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    if is_tiff(path):
        if flags != cv2.IMREAD_UNCHANGED:
            raise ValueError("imread: TIFF files are read unchanged only")
        img = read_tiff(path)
        if img.ndim == 3 and img.shape[2] >= 3:  # the file's RGB(A) -> OpenCV's BGR(A)
            img = np.ascontiguousarray(img[:, :, [2, 1, 0, 3][: img.shape[2]]])
        return img
    raw = Path(path).read_bytes()
    if Path(path).suffix.lower() == ".png":
        png_size(path, raw)  # damaged files fail here once, before libpng prints its own complaints
    img = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), flags) if raw else None
    if img is None:
        kind = "PNG" if Path(path).suffix.lower() == ".png" else "image"
        hw = header_size(path) if raw and kind == "image" else None
        if hw is not None:
            check_pixels(path, hw)  # (OpenCV refuses more than MAX_PIXELS silently)
        raise DataError(f"{path}: not a readable {kind} (corrupt or empty file)")
    return img


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path, data: bytes | None = None) -> tuple[int, int]:
    """``(H, W)`` of a PNG whose chunk structure and CRCs are intact.

    Checking the chunks here means a truncated or damaged file is reported once, as a
    :class:`DataError`, instead of libpng also printing its own complaint on stderr.
    """
    path = Path(path)
    if data is None:
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        data = path.read_bytes()
    if data[:8] != PNG_SIGNATURE:
        raise DataError(f"{path}: not a readable PNG (not a PNG file)")
    pos, size = 8, None
    while True:
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 12 + length  # length, type, data, crc
        if end > len(data):
            raise DataError(f"{path}: not a readable PNG (truncated)")
        kind = data[pos + 4 : pos + 8]
        if zlib.crc32(data[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            raise DataError(f"{path}: not a readable PNG (damaged {kind.decode('latin-1')!r} chunk)")
        if size is None:
            if kind != b"IHDR" or length < 8:
                raise DataError(f"{path}: not a readable PNG (no IHDR header)")
            size = int.from_bytes(data[pos + 12 : pos + 16], "big"), int.from_bytes(data[pos + 8 : pos + 12], "big")
            check_pixels(path, size)
        if kind == b"IEND":
            return size
        pos = end


def _check_size(path: Path, arr: np.ndarray, spec: DataSpec, *, nearest: bool) -> np.ndarray:
    h, w = arr.shape[:2]
    if (h, w) == (spec.size, spec.size):
        return arr
    if not spec.resize:
        raise DataError(
            f"{path}: size {w}x{h}, expected {spec.size}x{spec.size} (set data.resize: true to resize)"
        )
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA if h > spec.size else cv2.INTER_LINEAR
    out = cv2.resize(arr, (spec.size, spec.size), interpolation=interp)
    return out.reshape(spec.size, spec.size, *arr.shape[2:])


def read_image(path: str | Path, spec: DataSpec = DataSpec()) -> np.ndarray:
    """Decode an image to uint8 ``[H, W, C]`` with ``spec.in_channels`` channels."""
    path = Path(path)
    img = to_uint8(imread(path, cv2.IMREAD_UNCHANGED), path)  # 16-bit: the image's min-max (image_formats)
    if img.ndim == 2:
        img = img[:, :, None]
    c = spec.in_channels
    if img.shape[2] == 4:  # drop alpha
        img = img[:, :, :3]
    if img.shape[2] == 3:
        if c == 1:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, :, None]
        elif c == 3:
            img = img[:, :, ::-1]  # BGR -> RGB
        elif c == 2:
            img = img[:, :, ::-1][:, :, :2]
    elif img.shape[2] == 1 and c > 1:
        img = np.repeat(img, c, axis=2)
    if img.shape[2] != c:
        raise DataError(f"{path}: has {img.shape[2]} channels, config expects {c}")
    img = _check_size(path, img, spec, nearest=False)
    if img.ndim == 2:
        img = img[:, :, None]
    return np.ascontiguousarray(img)


def read_mask(path: str | Path, spec: DataSpec = DataSpec()) -> np.ndarray:
    """Decode a label mask to uint8 ``[H, W]`` and check its values are ``< num_classes``."""
    path = Path(path)
    m = decode_mask(path)
    if m.dtype != np.uint8 and m.max(initial=0) > 255:
        raise DataError(f"{path}: mask value {int(m.max())} is not a class label 0..{spec.num_classes - 1}")
    m = m.astype(np.uint8)
    bad = np.unique(m[m >= spec.num_classes])
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:5])
        raise DataError(f"{path}: mask values {shown} outside classes 0..{spec.num_classes - 1}")
    return np.ascontiguousarray(_check_size(path, m, spec, nearest=True))


def concat(parts: list[Split]) -> Split:
    seen: dict[str, str] = {}
    for p in parts:
        for k, (i, s) in enumerate(zip(p.ids, p.splits)):
            if i in seen:
                where = f"{p.image_paths[k]}: " if p.image_paths else ""
                raise DataError(f"{where}image id '{i}' appears in both {seen[i]}/ and {s}/")
            seen[i] = s
    masks = [p.masks for p in parts]
    return Split(
        ids=[i for p in parts for i in p.ids],
        images=rows.concat([p.images for p in parts]),
        masks=None if any(m is None for m in masks) else rows.concat(masks),
        splits=[s for p in parts for s in p.splits],
        image_paths=[x for p in parts for x in p.image_paths],
        orig_sizes=[x for p in parts for x in p.sizes()],
    )


# ------------------------------------------------------------------- decoding for dataset files
def decode_image(path: str | Path) -> np.ndarray:
    """Any image cv2 or tifffile reads (grey, RGB, RGBA; 8 or 16 bit or deeper, scaled to uint8 by
    :func:`kagglecmr.data.image_formats.to_uint8`) as uint8 ``[H, W, C]`` in RGB(A) order."""
    path = Path(path)
    img = to_uint8(imread(path, cv2.IMREAD_UNCHANGED), path)
    if img.ndim == 2:
        return img[:, :, None]
    if img.shape[2] == 3:
        cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)  # in place: a 100-Mpx photo is not copied
    elif img.shape[2] == 4:
        cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA, dst=img)
    return np.ascontiguousarray(img)


class ColourMaskError(DataError):
    """A mask whose pixels are colours (r, g, b not all equal) where grey labels were expected."""


def decode_mask(path: str | Path, *, to_grey: bool = False) -> np.ndarray:
    """A label mask's raw values (uint8 or uint16 ``[H, W]``); colour masks are :class:`ColourMaskError`,
    or with ``to_grey`` their luminance (binary masks saved as colour JPEGs, whose channels differ a little)."""
    path = Path(path)
    m = imread(path, cv2.IMREAD_UNCHANGED)
    if m.ndim == 3 and to_grey and m.shape[2] >= 3:
        m = cv2.cvtColor(np.ascontiguousarray(m[:, :, :3]), cv2.COLOR_BGR2GRAY)
    if m.ndim == 3:
        if m.shape[2] >= 3 and not (np.array_equal(m[:, :, 0], m[:, :, 1]) and np.array_equal(m[:, :, 0], m[:, :, 2])):
            raise ColourMaskError(f"{path}: mask is a colour image; expected one channel of class labels "
                                  f"(colour-coded classes: describe them in a dataset file's mask_values)")
        m = m[:, :, 0]
    if m.dtype not in (np.uint8, np.uint16) and m.dtype.kind in "iu" and m.size and m.min() >= 0 and m.max() <= 65535:
        m = m.astype(np.uint16 if m.max() > 255 else np.uint8)  # e.g. a TIFF of int32 labels
    if m.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: unsupported mask pixel type {m.dtype} (expected integer class labels 0..65535)")
    return np.ascontiguousarray(m)


def resize_to(arr: np.ndarray, hw: tuple[int, int], *, nearest: bool) -> np.ndarray:
    """``arr`` (``[H, W]`` or ``[H, W, C]``) at ``hw``: nearest for labels, area/linear for images."""
    h, w = arr.shape[:2]
    if (h, w) == tuple(hw):
        return arr
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA if h * w > hw[0] * hw[1] else cv2.INTER_LINEAR
    out = cv2.resize(arr, (hw[1], hw[0]), interpolation=interp)
    return np.ascontiguousarray(out.reshape(hw[0], hw[1], *arr.shape[2:]))


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image: from the header (PNG, TIFF, JPEG, ...), else by decoding it."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        return png_size(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    hw = header_size(path)
    if hw is not None:
        check_pixels(path, hw)
        return hw
    return tuple(imread(path, cv2.IMREAD_UNCHANGED).shape[:2])


def common_size(path: Path, items: dict, known: dict, setting) -> tuple[tuple[int, int], bool]:
    """``(size, resized)`` of a dataset (``path``) whose split ``items`` are ``(id, image, mask)``: the setting, else
    the one size of every image (``known``: sizes already decoded)."""
    if setting != "auto":
        return ((setting, setting) if isinstance(setting, int) else tuple(setting)), True
    seen: dict[tuple[int, int], Path] = {}
    for split in items.values():
        for _, ip, _ in split:
            hw = tuple(known[ip]) if ip in known else image_size(ip)
            seen.setdefault(hw, ip)
            if len(seen) > 1:
                (a, pa), (b, pb) = list(seen.items())[:2]
                raise DataError(f"{path}: images differ in size ({pa.name} {a[1]}x{a[0]}, {pb.name} {b[1]}x{b[0]}); "
                                f"set size: (e.g. size: {max(a[0], b[0])}) to resize them")
    return next(iter(seen)), False
