"""Inference on arbitrary images: ``kc.load_ensemble(...).predict_proba(images)`` and ``kagglecmr predict``.

A :class:`Predictor` holds the fold models of one or more runs (loaded with
:func:`kagglecmr.engine.ensembler.load_run`) and predicts images of ANY size: each image is converted to the
channels the run was trained on, resized to the trained size, predicted by every fold model and TTA
pass (:func:`kagglecmr.engine.ensembler.predict_images`: softmax mean, run weights), and its probabilities are
resized back to the image's own size.

What the run was trained on comes from ``fold0/dataset.json`` when present (keys ``in_channels``,
``channels``, ``size``, ``mask_values`` ``{raw value: class}``, ``classes``), else from the config:
grey or RGB by ``data.in_channels``, mask values ``0..K-1``, ``data.size``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from kagglecmr.data.channels import channel_rule, to_channels
from kagglecmr.data.loader import imread, png_size
from kagglecmr.data.mask_values import labels_to_raw
from kagglecmr.engine.ensembler import Run, _weights, check_compatible, latest_run, load_run, predict_images, tta_passes
from kagglecmr.utils.errors import DataError, KaggleCMRError
from kagglecmr.utils.io import atomic_path
from kagglecmr.utils.naming import natural_sorted
from kagglecmr.utils.runtime import resolve_device, setup_threads

CHUNK = 256  # images uploaded to the device at once (at most)
CHUNK_BYTES = 512 << 20  # ... and at most this many bytes of float32 probabilities at the trained size


# ------------------------------------------------------------------------------ what a run expects
def _size_hw(size) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def run_dataset(run: Run) -> dict:
    """The image/mask conventions ``run`` was trained with (``dataset.json`` of a fold, else the config)."""
    d = run.cfg.data
    info = {"in_channels": d.in_channels, "channels": {1: "grey", 3: "rgb"}.get(d.in_channels, f"{d.in_channels}ch"),
            "size": d.size, "mask_values": {str(k): k for k in range(d.num_classes)},
            "classes": [str(k) for k in range(d.num_classes)]}
    for f in sorted(run.path.glob("*/dataset.json")):
        try:
            saved = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            raise KaggleCMRError(f"{f}: not readable JSON") from None
        if not isinstance(saved, dict):
            raise KaggleCMRError(f"{f}: expected a JSON object")
        info.update({k: saved[k] for k in ("in_channels", "channels", "source_channels", "size", "mask_values",
                                           "classes") if saved.get(k) is not None})
        break
    if info["size"] is None:
        raise KaggleCMRError(f"{run.path}: neither the config nor dataset.json gives the trained input size")
    info["size"] = list(_size_hw(info["size"]))
    return info


def to_uint8(img: np.ndarray, where: str) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img / 257.0).round().astype(np.uint8)
    raise DataError(f"{where}: pixel type {img.dtype} not supported (uint8 or uint16)")


def prepare_image(img: np.ndarray, in_channels: int, size: tuple[int, int], where: str = "image",
                  keep: list[int] | None = None, source: int | None = None) -> np.ndarray:
    """One image (``[H, W]`` or ``[H, W, C]``, grey or RGB in RGB order, uint8/uint16) -> uint8
    ``[h, w, in_channels]`` at the trained ``size``, converted as :func:`kagglecmr.data.loader.read_image` does.
    ``keep``: the source channels the dataset kept (``dataset.json`` ``channels``, RGB order), e.g. ``[0, 1]``
    when a dead blue channel was dropped; ``source``: the dataset's channel space (``source_channels``), with
    which any image is converted exactly as training converted its images
    (:func:`kagglecmr.data.channels.to_channels`; an image that already has ``in_channels`` channels is taken
    as converted)."""
    img = to_uint8(np.asarray(img), where)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4) or min(img.shape[:2]) < 1:
        raise DataError(f"{where}: shape {img.shape}, expected [H, W] or [H, W, C] with C in 1..4")
    if source is not None and keep and len(keep) == in_channels and not (
            img.shape[2] == in_channels != source):
        img = to_channels(img, keep, source, where)
    elif keep and len(keep) == in_channels and img.shape[2] > max(keep) and img.shape[2] != in_channels:
        img = img[:, :, list(keep)]
    if img.shape[2] == 4:  # drop alpha
        img = img[:, :, :3]
    if img.shape[2] == 3 and in_channels == 1:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)[:, :, None]
    elif img.shape[2] == 3 and in_channels == 2:
        img = img[:, :, :2]
    elif img.shape[2] == 1 and in_channels > 1:
        img = np.repeat(img, in_channels, axis=2)
    if img.shape[2] != in_channels:
        raise DataError(f"{where}: has {img.shape[2]} channels, the run expects {in_channels}")
    h, w = size
    if img.shape[:2] != (h, w):
        interp = cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR
        img = cv2.resize(img, (w, h), interpolation=interp).reshape(h, w, in_channels)
    return np.ascontiguousarray(img)


def _resize_probs(p: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``[K, h, w]`` -> ``[K, H, W]`` bilinear (a convex mix of distributions stays one)."""
    if p.shape[1:] == tuple(hw):
        return p
    hwk = cv2.resize(np.ascontiguousarray(p.transpose(1, 2, 0)), (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(hwk.reshape(hw[0], hw[1], -1).transpose(2, 0, 1))


def _as_list(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise DataError(f"images: array shape {images.shape}, expected [N, H, W] or [N, H, W, C] (or a list)")
        return list(images)
    if isinstance(images, (list, tuple)):
        return [np.asarray(im) for im in images]
    raise DataError(f"images: expected a numpy array [N, H, W(, C)] or a list of arrays, got {type(images).__name__}")


# ------------------------------------------------------------------------------------- predictor
@dataclass
class Predictor:
    """An ensemble ready to predict: ``predict_proba(images)`` / ``predict(images)`` / ``to_raw(labels)``."""

    runs: list[Run]
    passes: list[str]
    weights: np.ndarray
    device: torch.device
    batch_size: int
    dataset: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.runs[0].cfg.data.num_classes

    @property
    def in_channels(self) -> int:
        return int(self.dataset["in_channels"])

    @property
    def keep(self) -> list[int] | None:
        """Source channels the dataset kept (RGB order), when ``dataset.json`` lists them."""
        ch = self.dataset.get("channels")
        return [int(c) for c in ch] if isinstance(ch, list) and all(isinstance(c, int) for c in ch) else None

    @property
    def source(self) -> int | None:
        """The dataset's channel space (``source_channels``) when ``dataset.json`` gives the kept channels."""
        return channel_rule(self.dataset)[1] if self.keep is not None else None

    @property
    def size(self) -> tuple[int, int]:
        return _size_hw(self.dataset["size"])

    @property
    def classes(self) -> list[str]:
        return list(self.dataset["classes"])

    @property
    def n_models(self) -> int:
        return sum(len(r.models) for r in self.runs)

    def _probs(self, batch: np.ndarray) -> np.ndarray:
        """uint8 ``[n, h, w, C]`` at the trained size -> float32 ``[n, K, h, w]``."""
        probs = predict_images(self.runs, batch, self.device, self.passes, self.weights, self.batch_size)
        return probs.astype(np.float32, copy=False)  # (run weights are float64)

    def chunk(self) -> int:
        """Images predicted at once: :data:`CHUNK`, fewer when their probabilities would pass
        :data:`CHUNK_BYTES` (then whole batches)."""
        n = CHUNK_BYTES // (self.num_classes * self.size[0] * self.size[1] * 4)
        return min(CHUNK, n // self.batch_size * self.batch_size if n >= self.batch_size else max(1, n))

    def _chunks(self, items: list[np.ndarray]):
        """float32 probabilities ``[K, H, W]`` of each image at its own size, a chunk of images at a time."""
        step = self.chunk()
        for start in range(0, len(items), step):
            batch = np.stack([prepare_image(im, self.in_channels, self.size, f"images[{start + i}]", self.keep,
                                            self.source)
                              for i, im in enumerate(items[start:start + step])])
            yield [_resize_probs(p, im.shape[:2]) for p, im in zip(self._probs(batch), items[start:start + step])]

    def predict_proba(self, images) -> np.ndarray | list[np.ndarray]:
        """float32 probabilities ``[N, K, H, W]`` at each image's own size (a list when sizes differ)."""
        items = _as_list(images)
        out = [p for probs in self._chunks(items) for p in probs]
        if out and len({im.shape[:2] for im in items}) == 1:
            return np.stack(out)
        return out if out else np.zeros((0, self.num_classes, *self.size), np.float32)

    def predict(self, images) -> np.ndarray | list[np.ndarray]:
        """uint8 class maps ``[N, H, W]`` (argmax of :meth:`predict_proba`, a chunk at a time: the probabilities
        of all images are never held at once; a list when sizes differ)."""
        items = _as_list(images)
        out = [p.argmax(0).astype(np.uint8) for probs in self._chunks(items) for p in probs]
        if out and len({im.shape[:2] for im in items}) == 1:
            return np.stack(out)
        return out if out else np.zeros((0, *self.size), np.uint8)

    def to_raw(self, labels: np.ndarray) -> np.ndarray:
        """Class maps -> the dataset's own mask values (``mask_values`` inverted, e.g. 0/255)."""
        return labels_to_raw(labels, self.dataset["mask_values"], self.num_classes)


def load_ensemble(runs, *, tta: bool = False, tta_flips: list[str] | None = None, weights: list[float] | None = None,
                  device: str = "auto", batch_size: int | None = None, full: bool = True,
                  runs_dir: Path = Path("runs"), select: str | None = None) -> Predictor:
    """The fold models of ``runs`` (one path or a list; default the latest under ``runs_dir``) with the full
    fit when present (``full``), flip TTA as ``ensemble --tta`` and run ``weights``; ``select`` (best, last,
    swa) takes that checkpoint of every fold instead of its ``train.select``, as ``ensemble --select``."""
    if runs is None or (isinstance(runs, (list, tuple)) and not runs):
        runs = [latest_run(runs_dir)]
    paths = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    dev = resolve_device(device)
    setup_threads(0)
    loaded = [load_run(p, dev, with_full=full, select=select) for p in paths]
    check_compatible(loaded)
    passes = tta_passes(loaded, tta or bool(tta_flips), tta_flips)
    bs = batch_size or loaded[0].cfg.infer.batch_size_for(dev.type)
    infos = [run_dataset(r) for r in loaded]
    for r, info in zip(loaded[1:], infos[1:]):
        if (info["in_channels"], info["size"]) != (infos[0]["in_channels"], infos[0]["size"]):
            raise KaggleCMRError(f"{r.path}: trained on {info['in_channels']} channels at {info['size']}, "
                                 f"{loaded[0].path} on {infos[0]['in_channels']} at {infos[0]['size']}")
    return Predictor(loaded, passes, _weights(loaded, weights), dev, bs, infos[0])


# ------------------------------------------------------------------------------- kagglecmr predict
def image_files(inputs) -> list[Path]:
    """PNG files named directly or found (natural order) in folders; stems must be unique."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = natural_sorted([q for q in p.iterdir() if q.is_file() and q.suffix.lower() == ".png"],
                                   key=lambda q: q.name)
            if not found:
                raise DataError(f"{p}: no PNG images in this folder")
            files += found
        elif not p.is_file():
            raise DataError(f"{p}: file not found")
        elif p.suffix.lower() != ".png":
            raise DataError(f"{p}: not a PNG file")
        else:
            files.append(p)
    if not files:
        raise DataError("predict: no images given")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise DataError(f"{f}: same name as {seen[f.stem]} (masks are written as <name>.png)")
        seen[f.stem] = f
    return files


def read_any_png(path: Path) -> np.ndarray:
    """A PNG as grey ``[H, W]`` or RGB ``[H, W, 3]`` (RGB order), uint8 or uint16 as stored."""

    img = imread(Path(path), cv2.IMREAD_UNCHANGED)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim == 3 and img.shape[2] == 3:
        img = np.ascontiguousarray(img[:, :, ::-1])
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return img


PALETTE = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 128, 255), (0, 255, 0), (255, 64, 64), (128, 0, 255)]


def overlay_contours(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """BGR picture of ``image`` (grey or RGB, drawn in its true colours) with each class's outline in a
    bright colour from :data:`PALETTE` (BGR), on a dark edge so it reads on light and dark tissue."""
    img = to_uint8(np.asarray(image), "overlay")
    bgr = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else np.ascontiguousarray(img[:, :, ::-1])
    thick = max(1, round(min(labels.shape) / 256))
    for k in [int(v) for v in np.unique(labels) if v > 0]:
        contours, _ = cv2.findContours((labels == k).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(bgr, contours, -1, (0, 0, 0), thick + 2)
        cv2.drawContours(bgr, contours, -1, PALETTE[(k - 1) % len(PALETTE)], thick)
    return bgr


def _write_png(path: Path, arr: np.ndarray, force: bool) -> None:
    with atomic_path(path, overwrite=force) as tmp:
        if not cv2.imwrite(str(tmp), arr):
            raise KaggleCMRError(f"{path}: cannot write PNG")


def predict_files(predictor: Predictor, inputs, out: Path, *, overlay: bool = False,
                  force: bool = False) -> dict:
    """Masks ``out/<stem>.png`` (dataset mask values, each image's own size) and, with ``overlay``,
    ``out/<stem>_overlay.png``.  Existing files are refused before anything is predicted unless ``force``."""
    files = image_files(inputs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KaggleCMRError(f"{out}: exists and is not a folder")
    targets = [out / f"{f.stem}.png" for f in files]
    overlays = [out / f"{f.stem}_overlay.png" for f in files] if overlay else []
    if not force:
        clash = [t for t in targets + overlays if t.exists()]
        if clash:
            raise KaggleCMRError(f"{clash[0]}: already exists ({len(clash)} of the outputs do; use --force)")
    for f in files:  # a damaged PNG fails here, before anything is written (files are decoded a chunk at a time)
        if f.suffix.lower() == ".png":
            png_size(f)
    labels, shapes, step = [], set(), predictor.chunk()
    for start in range(0, len(files), step):  # a chunk of files read, predicted and written at a time
        images = [read_any_png(f) for f in files[start:start + step]]
        out.mkdir(parents=True, exist_ok=True)
        for k, (img, lab) in enumerate(zip(images, predictor.predict(images)), start):
            _write_png(targets[k], predictor.to_raw(lab), force=True)
            if overlay:
                _write_png(overlays[k], overlay_contours(img, lab), force=True)
            labels.append(lab)
            shapes.add(img.shape[:2])
    sizes = sorted(f"{w}x{h}" for h, w in shapes)
    print(f"predict: {len(files)} images ({', '.join(sizes[:4])}{', ...' if len(sizes) > 4 else ''}) | "
          f"{predictor.n_models} models | TTA {'+'.join(predictor.passes)} -> {len(targets)} masks"
          f"{' + overlays' if overlay else ''} in {out}", flush=True)
    return {"masks": targets, "overlays": overlays, "labels": labels, "files": files}
