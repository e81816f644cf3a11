"""Inference on arbitrary images: ``kc.load_ensemble(...).predict_proba(images)`` and ``kagglecmr predict``.

A :class:`Predictor` holds the fold models of one or more runs (loaded with
:func:`kagglecmr.engine.ensembler.load_run`) and predicts images of ANY size: each image is converted to the
channels the run was trained on, resized to the trained size, predicted by every fold model and TTA
pass (:func:`kagglecmr.engine.ensembler.predict_images`: softmax mean, run weights), and its probabilities are
resized back to the image's own size.

What the run was trained on comes from ``fold0/dataset.json`` when present (keys ``in_channels``,
``channels``, ``size``, ``mask_values`` ``{raw value: class}``, ``classes``), else from the config:
grey or RGB by ``data.in_channels``, mask values ``0..K-1``, ``data.size``.

With a postprocessing plan (``load_ensemble(..., postprocess=...)``, ``predict --postprocess``; none by
default), :meth:`Predictor.predict` applies it as ``ensemble`` does: the component rules at each image's own
size and the empty-mask gates (:mod:`kagglecmr.engine.gating`) decided on the probabilities at the trained size.
Overlapping classes (``task: multilabel``): the probabilities are sigmoids per class; a class's mask is where
its probability is above its threshold, then its component rule, both from the run's ``postprocess.json``
(written by ``ensemble --postprocess auto``; 0.5 and no rule without one), and ``predict`` writes one PNG per
image and class, ``out/<class>/<stem>.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from kagglecmr.data.channels import channel_rule, to_channels
from kagglecmr.data.image_formats import to_uint8
from kagglecmr.data.mask_values import labels_to_raw
from kagglecmr.engine.ensembler import Run, _weights, check_compatible, latest_run, load_run, predict_images, tta_passes
from kagglecmr.engine.gate_runs import gated, split_keep
from kagglecmr.engine.multilabel_post import decode_plan
from kagglecmr.engine.outputs import label_at_size
from kagglecmr.engine.postprocess import apply_plan, load_plan
from kagglecmr.engine.presence import runs_presence
from kagglecmr.formats.multilabel import class_mask
from kagglecmr.utils.errors import DataError, KaggleCMRError
from kagglecmr.utils.runtime import resolve_device, setup_threads

CHUNK = 256  # images uploaded to the device at once
CHUNK_PIXELS = 1 << 24  # ... holding at most this many pixels at the trained size (a 12-Mpx image goes alone)
READ_PIXELS = 1 << 26  # predict: files decoded (and their masks written) this many pixels at a time


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
                                           "classes", "task") if saved.get(k) is not None})
        break
    if d.multilabel:  # each class's threshold and rule, as ensemble chose them on the OOF
        info["task"] = "multilabel"
        plan = run.path / "postprocess.json"
        info["plan"] = load_plan(plan, d.num_classes + 1) if plan.is_file() else None
    if info["size"] is None:
        raise KaggleCMRError(f"{run.path}: neither the config nor dataset.json gives the trained input size")
    info["size"] = list(_size_hw(info["size"]))
    return info


def prepare_image(img: np.ndarray, in_channels: int, size: tuple[int, int], where: str = "image",
                  keep: list[int] | None = None, source: int | None = None) -> np.ndarray:
    """One image (``[H, W]`` or ``[H, W, C]``, grey or RGB in RGB order, uint8, 16-bit or deeper: scaled by
    :func:`kagglecmr.data.image_formats.to_uint8`) -> uint8 ``[h, w, in_channels]`` at the trained ``size``,
    converted as :func:`kagglecmr.data.loader.decode_image` does.
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


def argmax_u8(p: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]`` class map of float ``[K, H, W]`` probabilities, a block of rows at a time (no int64 map
    of the whole image)."""
    out = np.empty(p.shape[1:], np.uint8)
    rows = max(1, (1 << 22) // max(1, p.shape[2]))
    for a in range(0, p.shape[1], rows):
        out[a:a + rows] = p[:, a:a + rows].argmax(0)
    return out


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
    plan: dict | None = field(default=None, kw_only=True)  # postprocessing (component rules, gates); None: argmax

    @property
    def num_classes(self) -> int:
        return self.runs[0].cfg.data.num_classes

    @property
    def in_channels(self) -> int:
        return int(self.dataset["in_channels"])

    @property
    def multilabel(self) -> bool:
        """Overlapping classes: sigmoid probabilities, packed masks (:mod:`kagglecmr.formats.multilabel`)."""
        return self.dataset.get("task") == "multilabel"

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

    def _per_chunk(self) -> int:
        """Images predicted at once: :data:`CHUNK`, fewer when they would hold over :data:`CHUNK_PIXELS` pixels."""
        h, w = self.size
        return max(1, min(CHUNK, CHUNK_PIXELS // (h * w)))

    def _batches(self, items: list[np.ndarray]):
        """``(start, uint8 [n, C, H, W])``: the images prepared for the model a chunk at a time."""
        per = self._per_chunk()
        for start in range(0, len(items), per):
            yield start, np.stack([prepare_image(im, self.in_channels, self.size, f"images[{start + i}]", self.keep,
                                                 self.source) for i, im in enumerate(items[start:start + per])])

    def _iter_probs(self, items: list[np.ndarray]):
        """``(n, float32 [K, H, W])`` of each image at its own size, predicted a chunk at a time (at most
        :data:`CHUNK` images and :data:`CHUNK_PIXELS` pixels at the trained size)."""
        for start, batch in self._batches(items):
            probs = self._probs(batch)
            del batch
            for i, p in enumerate(probs):
                yield start + i, _resize_probs(p, items[start + i].shape[:2])

    def predict_proba(self, images) -> np.ndarray | list[np.ndarray]:
        """float32 probabilities ``[N, K, H, W]`` at each image's own size (a list when sizes differ)."""
        items = _as_list(images)
        if not items:
            return np.zeros((0, self.num_classes, *self.size), np.float32)
        if len({im.shape[:2] for im in items}) > 1:
            return [p for _, p in self._iter_probs(items)]
        out = None
        for n, p in self._iter_probs(items):
            if len(items) == 1:
                return p[None]
            if out is None:
                out = np.empty((len(items), *p.shape), np.float32)
            out[n] = p
        return out

    def predict(self, images) -> np.ndarray | list[np.ndarray]:
        """uint8 class maps ``[N, H, W]`` (argmax of :meth:`predict_proba`, then the plan; a list when sizes differ),
        a chunk of probabilities in memory at a time; with overlapping classes packed maps (bit ``c - 1`` = class
        ``c``, the run's thresholds and rules)."""
        if self.plan is not None and not self.multilabel:
            return self._planned(images)
        items = _as_list(images)
        if self.multilabel:
            plan = self.dataset.get("plan")
            labels = [decode_plan(p, plan, self.num_classes) for _, p in self._iter_probs(items)]
        else:
            labels = [argmax_u8(p) for _, p in self._iter_probs(items)]
        if labels and len({m.shape for m in labels}) == 1:
            return np.stack(labels)
        return labels if labels else np.zeros((0, *self.size), np.uint8)

    def _planned(self, images) -> np.ndarray | list[np.ndarray]:
        items = _as_list(images)
        out: list[np.ndarray] = []
        for start, batch in self._batches(items):
            probs = self._probs(batch)
            keep = split_keep(self.plan, probs, lambda b=batch: runs_presence(self.runs, b, self.device, self.passes,
                                                                               self.weights, self.batch_size))
            labels = [apply_plan(label_at_size(p, im.shape[:2]), self.plan, self.num_classes)
                      for p, im in zip(probs, items[start:start + len(batch)])]
            out += gated(labels, keep)
        return np.stack(out) if out and len({m.shape for m in out}) == 1 else out

    def to_raw(self, labels: np.ndarray) -> np.ndarray:
        """Class maps -> the dataset's own mask values (``mask_values`` inverted, e.g. 0/255); with overlapping
        classes ``[..., K, H, W]``: each class's own mask in the binary files' values."""
        if self.multilabel:
            value = labels_to_raw(np.array([1]), self.dataset["mask_values"], 2)
            return np.stack([class_mask(labels, c) for c in range(1, self.num_classes + 1)], -3) * value[0]
        return labels_to_raw(labels, self.dataset["mask_values"], self.num_classes)

    def mask_files(self, stem: str) -> list[str]:
        """The file names of one image's masks: ``<stem>.png``, or one per class ``<class>/<stem>.png``."""
        return [f"{c}/{stem}.png" for c in self.classes] if self.multilabel else [f"{stem}.png"]


def load_ensemble(runs, *, tta: bool = False, tta_flips: list[str] | None = None, weights: list[float] | None = None,
                  device: str = "auto", batch_size: int | None = None, full: bool = True,
                  runs_dir: Path = Path("runs"), select: str | None = None, postprocess: str | None = None) -> Predictor:
    """The fold models of ``runs`` (one path or a list; default the latest under ``runs_dir``) with the full
    fit when present (``full``), flip TTA as ``ensemble --tta`` and run ``weights``; ``select`` (best, last,
    swa) takes that checkpoint of every fold instead of its ``train.select``, as ``ensemble --select``;
    ``postprocess`` (:func:`read_plan`) the plan :meth:`Predictor.predict` applies."""
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
    plan = read_plan(postprocess, paths, loaded[0].cfg.data.num_classes)
    return Predictor(loaded, passes, _weights(loaded, weights), dev, bs, infos[0], plan=plan)


def read_plan(postprocess: str | None, runs: list[Path], num_classes: int | None) -> dict | None:
    """``none``/None: no plan; ``auto``: the run's own ``postprocess.json`` (one run, written by ``ensemble``);
    else the path of a plan JSON."""
    if postprocess is None or str(postprocess) == "none":
        return None
    if str(postprocess) != "auto":
        return load_plan(postprocess, num_classes)
    if len(runs) != 1 or not runs[0].is_dir():
        raise KaggleCMRError("--postprocess auto: the run's own postprocess.json needs exactly one run folder; "
                             "give a plan file instead")
    if not (runs[0] / "postprocess.json").is_file():
        raise KaggleCMRError(f"{runs[0] / 'postprocess.json'}: not found (ensemble --postprocess auto writes it)")
    return load_plan(runs[0] / "postprocess.json", num_classes)


# ------------------------------------------------------------------------------- kagglecmr predict
