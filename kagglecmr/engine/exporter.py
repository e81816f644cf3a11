"""``kagglecmr export``: the whole ensemble in one ONNX or TorchScript file, checked against ``ensemble``.

The file holds every fold model of every run (plus the full fit when present), the TTA passes (flips, turns),
the softmax average with the run weights and the models' own normalisation: input ``image`` uint8
``[N, C, H, W]`` at the trained size, output ``probs`` float32 ``[N, K, H, W]``, dynamic batch.  With
overlapping classes (``task: multilabel``) ``probs`` are the averaged sigmoids of each class, and ``FILE.json``
holds the OOF-tuned thresholds and rules (``plan``).

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
from torch import nn

from kagglecmr.data.dataset import apply_dataset, load_dataset
from kagglecmr.engine.infer import predict_proba, tta_apply, tta_undo
from kagglecmr.engine.predictor import Predictor
from kagglecmr.models.factory import probabilities
from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.io import atomic_path, atomic_write_json

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-3
CHECK_IMAGES = 256  # at most this many images in the parity check
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
    """What ``ensemble`` computes (:func:`kagglecmr.engine.infer.predict_proba`), in float32 on the CPU."""
    nhwc = np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))
    total = None
    for run, w in zip(pred.runs, pred.weights):
        p = predict_proba(list(run.models.values()), nhwc, torch.device("cpu"), tta=pred.passes,
                          batch_size=CHECK_BATCH, amp=None) * w
        total = p if total is None else total + p
    return total


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
    """An exported ensemble loaded back: ``predict_proba(uint8 [N, C, H, W]) -> float32 [N, K, H, W]``."""

    path: Path
    format: str
    info: dict = field(default_factory=dict)
    _run: object = field(default=None, repr=False)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images)
        if x.dtype != np.uint8 or x.ndim != 4:
            raise KaggleCMRError(f"{self.path}: input must be uint8 [N, C, H, W], got {x.dtype} {list(x.shape)}")
        return self._run(np.ascontiguousarray(x))


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
    return ExportedModel(path, fmt, info, run)


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


def check_images(pred: Predictor, data) -> tuple[np.ndarray, str]:
    """uint8 NCHW images for the parity check: labelled images of ``data``, else seeded random ones."""
    c, (h, w) = pred.in_channels, pred.size
    if data is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (2 * CHECK_BATCH + 3, c, h, w), dtype=np.uint8), "random images (no --data)"

    ds = load_dataset(data)  # a folder or a dataset file, read as training read it
    apply_dataset(pred.runs[0].cfg, ds)  # the run's size and channels (a dataset of other classes is an error)
    split = ds.labelled()
    imgs = split.images[:CHECK_IMAGES].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(imgs), f"{len(imgs)} labelled (OOF) images of {data}"


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
    images, checked_on = check_images(pred, data)
    module = ensemble_module(pred)
    c, (h, w) = pred.in_channels, pred.size
    example = torch.from_numpy(images[:2].copy())
    with atomic_path(out, overwrite=force) as tmp:
        _write_file(module, example, fmt, tmp)
        loaded = load_export(tmp, fmt)
        err = check_parity(loaded, images, reference_probs(pred, images))
    k = pred.num_classes
    info = {
        "format": fmt, "file": out.name,
        "input": {"name": "image", "dtype": "uint8", "shape": ["N", c, h, w], "channels": pred.dataset["channels"],
                  "source_channels": pred.dataset.get("source_channels"),
                  "note": "values 0..255 as read from the PNG (RGB order for colour); resize to H x W first"},
        "output": {"name": "probs", "dtype": "float32", "shape": ["N", k, h, w],
                   "note": "sigmoid per class (classes overlap): a class is where its probability is above its "
                           "plan threshold" if pred.multilabel else "softmax, sums to 1"},
        "classes": pred.classes, "mask_values": pred.dataset["mask_values"],
        "tta": list(pred.passes), "runs": [str(r.path) for r in pred.runs], "weights": [float(x) for x in pred.weights],
        "checkpoints": [list(r.kept.values()) for r in pred.runs],
        "models": pred.n_models, "max_abs_error": err, "tolerance": TOLERANCE, "checked_on": checked_on,
        "checked_with": "onnxruntime" if fmt == "onnx" else "torch.jit.load",
        "torch": torch.__version__, "python": platform.python_version(),
    } | ({"task": "multilabel", "plan": pred.dataset.get("plan")} if pred.multilabel else {})
    atomic_write_json(sidecar, info)
    print(f"export: {pred.n_models} models x TTA {'+'.join(pred.passes)} -> {out} ({out.stat().st_size / 1e6:.1f} MB); "
          f"max |probs - ensemble| {err:.2e} on {checked_on} (tolerance {TOLERANCE:g}) -> {sidecar}", flush=True)
    return info
