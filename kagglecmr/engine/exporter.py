"""``kagglecmr export``: the whole ensemble in one ONNX or TorchScript file, checked against ``ensemble``.

The file holds every fold model of every run (plus the full fit when present), the TTA passes (flips, turns),
the softmax average with the run weights and the models' own normalisation: input ``image`` uint8
``[N, C, H, W]`` at the trained size, output ``probs`` float32 ``[N, K, H, W]``, dynamic batch.  With
overlapping classes (``task: multilabel``) ``probs`` are the averaged sigmoids of each class, and ``FILE.json``
holds the OOF-tuned thresholds and rules (``plan``).

Runs that predict their trained size by tiles (``data.patch`` / ``infer.tile``,
:mod:`kagglecmr.engine.tiles`) are exported per tile: the file takes one tile ``[N, C, th, tw]`` (the ensemble
of one window, TTA included), ``FILE.json`` records the tile settings (``tile``: size, overlap, weight,
batch) and the trained ``size``, and :func:`load_export` stitches larger images with the same
:func:`~kagglecmr.engine.tiles.predict_tiled_images` as ``ensemble``, so the two agree within :data:`TOLERANCE`.

ONNX goes through ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript: a clean dynamic batch
axis; the old TorchScript-based exporter mislabels the output's axes), TorchScript through
``torch.jit.trace``.  Before the file is renamed into place it is loaded back (onnxruntime /
``torch.jit.load``) and run on the labelled images of ``--data`` (or random images when none are
given), and its probabilities are compared with the float32 ensemble of
:func:`kagglecmr.engine.infer.predict_proba`; a difference over :data:`TOLERANCE` is an error and nothing is
written.  ``FILE.json`` beside it records the inputs, classes, mask values, TTA, runs and the error.
"""

from __future__ import annotations

import contextlib
import io
import json
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from kagglecmr.cfg.config import TileConfig
from kagglecmr.data.dataset import apply_dataset, load_dataset
from kagglecmr.engine.infer import predict_proba_tiled, tta_apply, tta_undo
from kagglecmr.engine.predictor import Predictor
from kagglecmr.engine.tiles import as_hw, needs_tiles, predict_tiled_images
from kagglecmr.models.factory import probabilities
from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.io import atomic_path, atomic_write_json

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-3
CHECK_IMAGES = 256  # at most this many images in the parity check
CHECK_TILED_IMAGES = 16  # ... when they are predicted by tiles (each is many windows)
CHECK_BATCH = 8  # the check runs in batches of this many (and one ragged batch): the batch axis is dynamic
EXTRA_HINT = "pip install 'kagglecmr[export]'"


class EnsembleModule(nn.Module):
    """uint8 ``[N, C, H, W]`` -> weighted mean probabilities (softmax, or sigmoid per class) over models and TTA
    passes, float32 ``[N, K, H, W]``."""

    def __init__(self, models: list[nn.Module], model_weights: list[float], passes: list[str]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.model_weights = [float(w) for w in model_weights]
        self.passes = list(passes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float() / 255.0
        acc = None
        for w, model in zip(self.model_weights, self.models):
            for name in self.passes:
                p = probabilities(model, model(tta_apply(x, name)))
                p = tta_undo(p, name) * (w / len(self.passes))
                acc = p if acc is None else acc + p
        return acc


def ensemble_module(pred: Predictor) -> EnsembleModule:
    """The predictor's models as one CPU float32 module (each fold weighs run weight / models of the run)."""
    models, weights = [], []
    for run, w in zip(pred.runs, pred.weights):
        for m in run.models.values():
            models.append(m.to("cpu", memory_format=torch.contiguous_format).float().eval())
            weights.append(float(w) / len(run.models))
    return EnsembleModule(models, weights, pred.passes).eval()


def reference_probs(pred: Predictor, images_nchw: np.ndarray) -> np.ndarray:
    """What ``ensemble`` computes (:func:`kagglecmr.engine.infer.predict_proba_tiled`: by tiles where a run
    tiles), in float32 on the CPU."""
    nhwc = np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))
    total = None
    for run, w in zip(pred.runs, pred.weights):
        p = predict_proba_tiled(list(run.models.values()), nhwc, torch.device("cpu"), tile=run.cfg.tile,
                                tta=pred.passes, batch_size=CHECK_BATCH, amp=None) * w
        total = p if total is None else total + p
    return total


def export_tile(pred: Predictor) -> TileConfig | None:
    """The tiles the runs predict their trained size by (None: whole images); one file holds one tile."""
    plans = [r.cfg.tile if r.cfg.tile is not None and needs_tiles(pred.size, r.cfg.tile.size) else None
             for r in pred.runs]
    keys = [None if t is None else (as_hw(t.size), t.overlap, t.weight) for t in plans]
    for run, key in zip(pred.runs[1:], keys[1:]):
        if key != keys[0]:
            def say(k):
                return "whole images" if k is None else f"tiles {k[0][0]}x{k[0][1]} (overlap {k[1]:g}, {k[2]})"
            raise KaggleCMRError(f"{run.path}: predicts by {say(key)}, {pred.runs[0].path} by {say(keys[0])}; "
                                 f"one exported file holds one tiling: export these runs separately")
    return plans[0]


def tile_info(tile: TileConfig | None) -> dict | None:
    """The sidecar's ``tile`` entry."""
    if tile is None:
        return None
    return {"size": list(as_hw(tile.size)), "overlap": tile.overlap, "weight": tile.weight, "batch": tile.batch}


# ------------------------------------------------------------------------------------ loading back
def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise KaggleCMRError(f"--format onnx needs the onnx packages ({exc.name} is missing): {EXTRA_HINT}") from None


@dataclass
class ExportedModel:
    """An exported ensemble loaded back: ``predict_proba(uint8 [N, C, H, W]) -> float32 [N, K, H, W]``.

    A per-tile export (``tile`` from ``FILE.json``) predicts images of any other size by overlapping tiles,
    stitched as ``ensemble`` stitches them (:func:`kagglecmr.engine.tiles.predict_tiled_images`); an image
    smaller than the tile is zero-padded to it."""

    path: Path
    format: str
    info: dict = field(default_factory=dict)
    _run: object = field(default=None, repr=False)
    tile: TileConfig | None = None

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images)
        if x.dtype != np.uint8 or x.ndim != 4:
            raise KaggleCMRError(f"{self.path}: input must be uint8 [N, C, H, W], got {x.dtype} {list(x.shape)}")
        if self.tile is None or x.shape[2:] == as_hw(self.tile.size) or not len(x):
            return self._run(np.ascontiguousarray(x))
        return predict_tiled_images(self._windows, x.transpose(0, 2, 3, 1), self.tile)

    def _windows(self, windows: np.ndarray) -> np.ndarray:
        """uint8 ``[n, th, tw, C]`` tiles -> float32 ``[n, K, th, tw]`` (the stitcher's ``predict_window``)."""
        return self._run(np.ascontiguousarray(windows.transpose(0, 3, 1, 2)))


def load_export(path, fmt: str | None = None) -> ExportedModel:
    """Load an exported ``.onnx`` (onnxruntime) or TorchScript file; an unreadable file is one error line."""
    path = Path(path)
    fmt = fmt or ("onnx" if path.suffix.lower() == ".onnx" else "torchscript")
    if not path.is_file():
        raise KaggleCMRError(f"{path}: export file not found")
    if fmt == "onnx":
        _require_onnx()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # a broken file is reported once, by us
        try:
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise KaggleCMRError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
        names = [i.name for i in sess.get_inputs()]
        if names != ["image"]:
            raise KaggleCMRError(f"{path}: ONNX model takes {names}, expected one input named 'image'")

        def run(x):
            return sess.run(["probs"], {"image": x})[0]
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, not removed
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise KaggleCMRError(f"{path}: not a readable TorchScript model ({type(exc).__name__})") from None

        def run(x):
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()
    sidecar = path.with_name(path.name + ".json")
    info = {}
    if sidecar.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            info = json.loads(sidecar.read_text())
    tile = None
    if isinstance(info, dict) and info.get("tile") is not None:
        try:
            tile = TileConfig(**info["tile"])
        except (TypeError, ValidationError):
            raise KaggleCMRError(f"{sidecar}: 'tile' is not a tile setting ({info['tile']!r}); expected "
                                 f"{{size, overlap, weight, batch}} as kagglecmr export writes it") from None
    return ExportedModel(path, fmt, info if isinstance(info, dict) else {}, run, tile)


def parity_error(model: ExportedModel, images: np.ndarray, reference: np.ndarray) -> float:
    """Max absolute difference between the file's probabilities and ``reference`` (batches of CHECK_BATCH)."""
    out = np.concatenate([model.predict_proba(images[i:i + CHECK_BATCH]) for i in range(0, len(images), CHECK_BATCH)])
    if out.shape != reference.shape:
        raise KaggleCMRError(f"{model.path}: output shape {list(out.shape)}, expected {list(reference.shape)}")
    return float(np.abs(out.astype(np.float32) - reference).max())


def check_parity(model: ExportedModel, images: np.ndarray, reference: np.ndarray, tol: float = TOLERANCE) -> float:
    err = parity_error(model, images, reference)
    if not err <= tol:
        raise KaggleCMRError(f"{model.path}: exported probabilities differ from the ensemble by {err:.2e} "
                             f"(more than {tol:g}); not written")
    return err


@dataclass
class ExportPredictor(Predictor):
    """An exported file behind the :class:`~kagglecmr.engine.predictor.Predictor` interface (any-size images,
    ``predict``/``predict_proba``/``to_raw``), configured from its ``FILE.json``."""

    exported: ExportedModel | None = None

    @classmethod
    def load(cls, path) -> ExportPredictor:
        model = load_export(path)
        info = model.info
        try:
            _, c, h, w = info["input"]["shape"]
            h, w = info.get("size") or (h, w)  # a per-tile export takes tiles of its trained size
            dataset = {"in_channels": int(c), "size": [int(h), int(w)], "channels": info["input"].get("channels"),
                       "source_channels": info["input"].get("source_channels"),
                       "mask_values": dict(info["mask_values"]), "classes": list(info["classes"])}
            if info.get("task") == "multilabel":
                dataset |= {"task": "multilabel", "plan": info.get("plan")}
            passes = list(info["tta"])
        except (KeyError, TypeError, ValueError):
            raise KaggleCMRError(f"{model.path}: {model.path.name}.json beside it is missing or incomplete "
                                 f"(kagglecmr export writes it)") from None
        return cls([], passes, np.ones(1), torch.device("cpu"), CHECK_BATCH, dataset, model)

    @property
    def num_classes(self) -> int:
        return len(self.dataset["classes"])

    @property
    def n_models(self) -> int:
        return int(self.exported.info.get("models", 1))

    def _probs(self, batch: np.ndarray) -> np.ndarray:
        nchw = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        return np.concatenate([self.exported.predict_proba(nchw[i:i + self.batch_size])
                               for i in range(0, len(nchw), self.batch_size)]).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------ export
def _write_file(module: EnsembleModule, example: torch.Tensor, fmt: str, tmp: Path) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            if fmt == "onnx":
                torch.onnx.export(module, (example,), str(tmp), dynamo=True, external_data=False,
                                  input_names=["image"], output_names=["probs"], verbose=False,
                                  dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}})
            else:
                with torch.no_grad():  # (under inference_mode the weights would be copied in as constants)
                    traced = torch.jit.trace(module, example, check_trace=False)
                torch.jit.save(traced, str(tmp))
        except KaggleCMRError:
            raise
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise KaggleCMRError(f"--format {fmt}: export failed ({type(exc).__name__}: {msg})") from None


def check_images(pred: Predictor, data, limit: int = CHECK_IMAGES) -> tuple[np.ndarray, str]:
    """uint8 NCHW images for the parity check: labelled images of ``data`` (at most ``limit``), else seeded
    random ones."""
    c, (h, w) = pred.in_channels, pred.size
    if data is None:
        rng = np.random.default_rng(0)
        n = min(2 * CHECK_BATCH + 3, max(limit, 2))
        return rng.integers(0, 256, (n, c, h, w), dtype=np.uint8), "random images (no --data)"

    ds = load_dataset(data)  # a folder or a dataset file, read as training read it
    apply_dataset(pred.runs[0].cfg, ds)  # the run's size and channels (a dataset of other classes is an error)
    split = ds.labelled()
    imgs = split.images[:limit].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(imgs), f"{len(imgs)} labelled (OOF) images of {data}"


def example_input(images: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """Two of the check images cut (or zero-padded) to the module's input size ``hw``: what the export traces."""
    ex = np.zeros((min(2, len(images)), images.shape[1], *hw), np.uint8)
    h, w = min(hw[0], images.shape[2]), min(hw[1], images.shape[3])
    ex[:, :, :h, :w] = images[:len(ex), :, :h, :w]
    return torch.from_numpy(ex)


def export_ensemble(pred: Predictor, out: Path, fmt: str, *, data=None, force: bool = False) -> dict:
    """Write ``out`` (+ ``out.json``) after the parity check; returns the sidecar's content."""
    if fmt not in FORMATS:
        raise KaggleCMRError(f"--format {fmt}: expected onnx or torchscript")
    if fmt == "onnx":
        _require_onnx()
    context = [r for r in pred.runs if r.cfg.data.context != "none"]
    if context:
        raise KaggleCMRError(f"{context[0].path}: trained with data.context: {context[0].cfg.data.context} (each "
                             f"image's partner frame, found among a split's images, is an extra input), which one "
                             f"exported file of single images cannot reproduce; use kagglecmr ensemble/predict "
                             f"for this run, or retrain it without data.context")
    out = Path(out)
    sidecar = out.with_name(out.name + ".json")
    for p in (out, sidecar):
        if p.exists() and not force:
            raise KaggleCMRError(f"{p}: already exists (use --force to overwrite)")
    tile = export_tile(pred)
    images, checked_on = check_images(pred, data, CHECK_IMAGES if tile is None else CHECK_TILED_IMAGES)
    module = ensemble_module(pred)
    c, (h, w) = pred.in_channels, pred.size
    ih, iw = (h, w) if tile is None else as_hw(tile.size)  # the module's input: the image, or one tile
    with atomic_path(out, overwrite=force) as tmp:
        _write_file(module, example_input(images, (ih, iw)), fmt, tmp)
        loaded = load_export(tmp, fmt)
        loaded.tile = tile
        err = check_parity(loaded, images, reference_probs(pred, images))
    if tile is not None:
        checked_on += f" ({h}x{w}, by tiles of {ih}x{iw})"
    k = pred.num_classes
    note = ("values 0..255 as decoded (RGB order for colour); resize to H x W first" if tile is None else
            f"one {ih}x{iw} tile, values 0..255 as decoded (RGB order for colour): resize an image to the trained "
            f"size {h}x{w}, cut overlapping tiles and stitch their probabilities as 'tile' says (load_export does)")
    info = {
        "format": fmt, "file": out.name,
        "input": {"name": "image", "dtype": "uint8", "shape": ["N", c, ih, iw], "channels": pred.dataset["channels"],
                  "source_channels": pred.dataset.get("source_channels"), "note": note},
        "output": {"name": "probs", "dtype": "float32", "shape": ["N", k, ih, iw],
                   "note": "sigmoid per class (classes overlap): a class is where its probability is above its "
                           "plan threshold" if pred.multilabel else "softmax, sums to 1"},
        "size": [h, w], "tile": tile_info(tile),
        "classes": pred.classes, "mask_values": pred.dataset["mask_values"],
        "tta": list(pred.passes), "runs": [str(r.path) for r in pred.runs], "weights": [float(x) for x in pred.weights],
        "checkpoints": [list(r.kept.values()) for r in pred.runs],
        "models": pred.n_models, "max_abs_error": err, "tolerance": TOLERANCE, "checked_on": checked_on,
        "checked_with": "onnxruntime" if fmt == "onnx" else "torch.jit.load",
        "torch": torch.__version__, "python": platform.python_version(),
    } | ({"task": "multilabel", "plan": pred.dataset.get("plan")} if pred.multilabel else {})
    atomic_write_json(sidecar, info)
    per = "" if tile is None else f" per {ih}x{iw} tile"
    print(f"export: {pred.n_models} models x TTA {'+'.join(pred.passes)}{per} -> {out} ({out.stat().st_size / 1e6:.1f} MB); "
          f"max |probs - ensemble| {err:.2e} on {checked_on} (tolerance {TOLERANCE:g}) -> {sidecar}", flush=True)
    return info
