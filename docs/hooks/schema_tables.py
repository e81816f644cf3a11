"""MkDocs hook: tables of the config keys and dataset-file keys, generated from the pydantic models.

A marker line ``<!-- schema:NAME -->`` in a page becomes a table:

``config-keys``
    every key of the experiment config (:class:`Config`), one table per section, with type, default and meaning
``dataset-keys``
    every key of a dataset file (:class:`DatasetFile`)
``recipes``
    the shipped experiment configs side by side

Meanings come from each field's ``description``, else from :data:`CONFIG_NOTES` / :data:`DATASET_NOTES` below.
A key with neither, or a note naming a key the model does not have, is a warning (so ``mkdocs build --strict``
fails and the docs cannot drift from the schema).  ``render_config_keys()``, ``render_dataset_keys()`` and
``render_recipes()`` return the Markdown without MkDocs.
"""

from __future__ import annotations

import logging
import re
import sys
import types
import typing
from pathlib import Path

MARKER = re.compile(r"^<!--\s*schema:([\w-]+)\s*-->[ \t]*$", re.MULTILINE)
log = logging.getLogger("mkdocs.hooks.schema_tables")

# Meanings of keys whose pydantic field has no description (short: one table cell each).
CONFIG_NOTES = {
    "name": "Run name (default: the config file's name; `train --name` overrides it).",
    "seed": "Random seed of weights, batches and augmentation (`train --seeds` trains one run per seed).",
    "data.in_channels": "Input channels of the images (default: the dataset's kept channels).",
    "data.resize": "With a pinned `size`: resize the images to it instead of erroring on a mismatch.",
    "model.arch": "Decoder architecture of segmentation-models-pytorch: `Unet`, `UnetPlusPlus`, `FPN`, ...",
    "model.encoder": "Encoder name (smp's, or `tu-<timm name>` for a timm encoder).",
    "loss.name": "Loss: Dice and/or cross-entropy, focal, Lovász or Tversky, alone or combined.",
    "loss.dice_weight": "Weight of the Dice term in a combined loss.",
    "loss.ce_weight": "Weight of the cross-entropy (or focal) term in a combined loss.",
    "loss.class_weights": "Per-class weights of the cross-entropy, background first (one per class).",
    "loss.tversky_alpha": "Tversky α (false-positive weight; β = 1 − α).",
    "loss.focal_gamma": "Focal loss γ.",
    "loss.label_smoothing": "Label smoothing of the cross-entropy.",
    "augment.backend": "`albumentations` (image by image on the CPU) or `torch` (whole batches on the device); `auto`: "
                        "`torch` on a GPU, else `albumentations`.",
    "augment.hflip": "Probability of a left/right flip.",
    "augment.vflip": "Probability of an up/down flip.",
    "augment.rot90": "Probability of a random quarter turn (enables the rotation TTA passes).",
    "augment.rotate": "Largest rotation of the affine, in degrees.",
    "augment.scale": "Zoom range of the affine.",
    "augment.translate": "Largest shift of the affine, as a fraction of the side.",
    "augment.elastic": "Probability of an elastic deformation.",
    "augment.elastic_alpha": "Strength of the elastic deformation.",
    "augment.elastic_sigma": "Smoothness of the elastic deformation.",
    "augment.brightness": "Largest brightness change of the intensity jitter.",
    "augment.contrast": "Largest contrast change of the intensity jitter.",
    "augment.gamma_range": "Range of the random gamma.",
    "augment.noise_std": "Standard deviation of the gaussian noise (images scaled to 0..1).",
    "train.epochs": "Epochs per fold (`--epochs`).",
    "train.lr": "Peak learning rate (`--lr`).",
    "train.weight_decay": "Weight decay of the optimiser.",
    "train.optimizer": "Optimiser.",
    "train.scheduler": "Learning-rate schedule after the warm-up.",
    "train.warmup_epochs": "Linear warm-up length, in epochs (fractions allowed).",
    "train.min_lr_ratio": "Final learning rate of the cosine schedule, as a fraction of `lr`.",
    "train.amp": "Mixed precision: `auto` (bf16 where supported), `bf16`, `fp16` or `none`.",
    "train.channels_last": "Channels-last memory format on GPUs.",
    "train.compile": "`torch.compile` the model.",
    "train.device": "`auto`, `cpu`, `cuda` or `cuda:N` (`--device`).",
    "train.val_batch_size": "Images per forward pass when scoring the held-out fold.",
    "train.pseudo": "Pseudo labels (what `train --pseudo*` set).",
}

DATASET_NOTES = {
    "name": "Run and report name (default: the file's stem).",
    "root": "Folder the patterns are relative to; a relative root is relative to the dataset file.",
    "classes": "Class names, background first; their count is the number of classes (default: from the mask values).",
    "splits": "`train` (required), `val`, `test`: each `{image: PATTERN, mask: PATTERN}`; see [Splits](#splits).",
    "splits.image": "Pattern of the split's images.",
    "splits.mask": "Pattern of its masks, or a labels CSV; optional (a test split with masks is scored).",
    "mask_values": "How mask files map to classes: `auto`, a map `{raw: class}`, `threshold` or `nonzero`; see "
                   "[Mask values](#mask-values).",
    "channels": "`auto` (drop channels constant in every training image) or a list of channels to keep (RGB order).",
    "size": "`auto` (the images' common size) or a side / `[H, W]` every image is resized to.",
    "group": "Regex whose first group, applied to the id, names a group: a group never spans two folds.",
    "submission": "The submission CSV's format; see [Submission format](#submission-format). Default: the cardiac MR "
                  "competition's format.",
    "labels": "How a labels CSV is read when a split's `mask` is a `.csv` file; see [Labels CSV](#labels-csv).",
    "recipe": "The experiment config `train` uses without `--config` (a shipped name or a path relative to the file).",
}

_warned: set[str] = set()


def _warn(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


# ------------------------------------------------------------------------------------------- the models
def config_model():
    """The experiment config's pydantic model (:class:`kagglecmr.cfg.config.Config`)."""
    from kagglecmr.cfg.config import Config

    return Config


def dataset_model():
    """The dataset file's pydantic model (:class:`kagglecmr.data.dataset_file.DatasetFile`)."""
    from kagglecmr.data.dataset_file import DatasetFile

    return DatasetFile


def shipped_configs() -> dict[str, Path]:
    """``{name: path}`` of the experiment configs shipped with the package (``--config NAME``)."""
    from kagglecmr.cfg.config import SHIPPED_CONFIGS
    from kagglecmr.cfg.config import shipped_configs as names

    return {name: SHIPPED_CONFIGS / f"{name}.yaml" for name in names()}


# ------------------------------------------------------------------------------------------- formatting
def _is_model(tp) -> bool:
    return isinstance(tp, type) and hasattr(tp, "model_fields")


def type_label(tp) -> str:
    """A readable type: ``int``, ``float ≥ 0``, ``[int, int]``, one of `a`, `b`, ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is typing.Any:
        return "any"
    if origin is typing.Literal:
        names = [f"`{a}`" for a in args]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_label(a) for a in args)
    if origin in (list, typing.List):  # noqa: UP006
        return f"list of ({type_label(args[0])})" if args and typing.get_origin(args[0]) else (
            f"list of {type_label(args[0])}" if args else "list")
    if origin is tuple:
        return "[" + ", ".join(type_label(a) for a in args) + "]"
    if origin is dict:
        return "mapping" + (f" ({type_label(args[0])} → {type_label(args[1])})" if args else "")
    if _is_model(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _bounds(field) -> str:
    out = []
    for m in getattr(field, "metadata", []):
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return ", ".join(out)


def yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "model_dump"):
        return yaml_value(value.model_dump(mode="json"))
    return str(value)


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    return f"`{yaml_value(value)}`"


def _cell(text: str) -> str:
    """Table-cell safe: one line, pipes escaped, ``<``/``>`` as entities outside code spans."""
    parts = re.split(r"(`[^`]*`)", " ".join(str(text).split()))
    parts = [p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;") for p in parts]
    return "".join(parts).replace("|", "\\|")


def _rows(model, prefix: str, notes: dict[str, str], used: set[str]) -> tuple[list[str], list[tuple[str, object]]]:
    """Table rows of ``model``'s plain keys, and its nested sections as ``(dotted name, model)``."""
    rows, sections = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        tp = field.annotation
        if _is_model(tp):
            sections.append((key, tp))
            continue
        meaning = field.description or notes.get(key)
        if key in notes:
            used.add(key)
        if not meaning:
            _warn(f"schema_tables: key {key} has neither a description nor a note (docs/hooks/schema_tables.py)")
            meaning = ""
        kind = type_label(tp)
        bounds = _bounds(field)
        rows.append(f"| `{key}` | {_cell(kind + (', ' + bounds if bounds else ''))} | {_cell(_default(field))} | "
                    f"{_cell(meaning)} |")
    return rows, sections


_HEADER = ["| key | type | default | meaning |", "|---|---|---|---|"]


def _check_notes(notes: dict[str, str], used: set[str], what: str) -> None:
    for key in sorted(set(notes) - used):
        _warn(f"schema_tables: {what} note for {key}, which the schema does not have")


def render_config_keys() -> str:
    """Every experiment-config key: top-level keys, then one table per section (``data``, ``model``, ...)."""
    config = config_model()
    used: set[str] = set()
    rows, sections = _rows(config, "", CONFIG_NOTES, used)
    out = ["### Top level", "", *_HEADER, *rows, ""]
    queue = list(sections)
    while queue:
        key, model = queue.pop(0)
        if key in CONFIG_NOTES:
            used.add(key)
        rows, nested = _rows(model, f"{key}.", CONFIG_NOTES, used)
        doc = (model.__doc__ or "").strip()
        doc = "" if doc.startswith(("!!!", "Usage docs")) or "BaseModel" in doc else " ".join(doc.split())
        out += [f"### `{key}`", ""] + ([doc, ""] if doc else [])
        note = CONFIG_NOTES.get(key)
        if note:
            out += [note, ""]
        out += [*_HEADER, *rows, ""]
        queue[:0] = nested
    _check_notes(CONFIG_NOTES, used, "config")
    return "\n".join(out)


def render_dataset_keys() -> str:
    """Every dataset-file key (``splits.image`` / ``splits.mask`` for each split's patterns)."""
    model = dataset_model()
    used: set[str] = set()
    rows, sections = _rows(model, "", DATASET_NOTES, used)
    split_field = model.model_fields.get("splits")
    if split_field is not None:  # dict[Literal[...], SplitPatterns]: the patterns of one split
        for arg in typing.get_args(split_field.annotation):
            if _is_model(arg):
                sub, _ = _rows(arg, "splits.", DATASET_NOTES, used)
                rows += [r.replace("`splits.", "`splits.<split>.", 1) for r in sub]
    _check_notes(DATASET_NOTES, used, "dataset")
    return "\n".join([*_HEADER, *rows, ""])


def _summary(cfg) -> dict[str, str]:
    m, a, t, lo = cfg.model, cfg.augment, cfg.train, cfg.loss
    if m.weights.startswith("pkg:"):
        weights = "ImageNet (bundled)"
    elif m.weights == "imagenet":
        weights = "ImageNet (download)"
    elif m.weights == "none":
        weights = "scratch"
    else:
        weights = m.weights
    scale = m.input_scale or 1.0
    flips = [f"{k} {getattr(a, k):g}" for k in ("hflip", "vflip", "rot90") if getattr(a, k) > 0]
    extra = [f"{k} {getattr(a, k):g}" for k in ("affine", "intensity", "gamma", "color", "elastic", "noise") if getattr(a, k) > 0]
    return {
        "model": f"{m.arch} + `{m.encoder}`, {weights}",
        "input": f"×{scale:g}" + (" (in the model)" if scale != 1 else ""),
        "loss": f"`{lo.name}`" + (", Dice per image" if lo.dice_per_image else ""),
        "training": f"{t.epochs} epochs, batch {t.batch_size}, lr {t.lr:g}",
        "augmentation": ", ".join(flips + extra) or "none",
        "TTA (`--tta`)": ", ".join(cfg.infer.tta),
    }


def render_recipes() -> str:
    """The shipped experiment configs side by side (``--config NAME``)."""
    import yaml

    config = config_model()
    configs = shipped_configs()
    if not configs:
        _warn("schema_tables: no shipped configs found (kagglecmr/cfg/*.yaml)")
        return ""
    cols = {}
    for name, path in configs.items():
        raw = yaml.safe_load(path.read_text()) or {}
        raw.setdefault("name", name)
        cols[name] = _summary(config.model_validate(raw))
    names = list(cols)
    rows = list(next(iter(cols.values())))
    out = ["| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        out.append(f"| {row} | " + " | ".join(_cell(cols[n][row]) for n in names) + " |")
    return "\n".join(out) + "\n"


RENDERERS = {"config-keys": render_config_keys, "dataset-keys": render_dataset_keys, "recipes": render_recipes}


# ------------------------------------------------------------------------------------------------ MkDocs
def on_config(config):
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:  # document the checkout being built, before any installed copy
        sys.path.insert(0, root)
    snippets = config.mdx_configs.get("pymdownx.snippets")
    if snippets is not None:  # includes (docs/benchmarks.md) relative to the repo root, wherever mkdocs runs
        snippets["base_path"] = [root]
    return config


def on_page_markdown(markdown, page, config, files):
    def replace(match):
        name = match.group(1)
        if name not in RENDERERS:
            from mkdocs.exceptions import PluginError

            raise PluginError(f"{page.file.src_uri}: unknown marker <!-- schema:{name} --> "
                              f"(known: {', '.join(RENDERERS)})")
        return RENDERERS[name]()

    return MARKER.sub(replace, markdown)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    logging.basicConfig()
    for name, render in RENDERERS.items():
        print(f"<!-- {name} -->\n{render()}")
