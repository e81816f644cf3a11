"""Experiment configs: one YAML file per experiment, validated on load.

Unknown keys and bad values are one-line :class:`~kagglecmr.utils.errors.ConfigError` messages naming
the file and the key.  ``--config`` takes a path or the bare name of a shipped config
(``--config demo``): a ``configs/demo.yaml`` in the current folder first, else the YAML file shipped inside
the package (``kagglecmr/cfg/demo.yaml``, package data read through :mod:`importlib.resources`, so an
installed wheel has them too).  Command-line overrides use dotted keys (``--set train.lr=3e-4``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kagglecmr.utils.errors import ConfigError

SHIPPED_CONFIGS = Path(str(resources.files(__package__)))  # the recipes shipped as package data: kagglecmr/cfg/*.yaml
SHIPPED_DATASETS = SHIPPED_CONFIGS / "datasets"  # the dataset files shipped beside them
LOCAL_CONFIGS = "configs"  # a folder of the user's own recipes in the current directory, looked up first


@dataclass(frozen=True)
class DataSpec:
    """What every image and mask must look like (from config ``data``)."""

    size: int = 96
    in_channels: int = 1
    num_classes: int = 4
    resize: bool = False  # resize other sizes to ``size`` (masks: nearest neighbour) instead of failing


def hw_of(size) -> tuple[int, int] | None:
    """A side (``256``) or ``[H, W]`` as ``(H, W)``; None stays None."""
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _at_least_8(v):
    if v is not None and min(hw_of(v)) < 8:
        raise ValueError("must be at least 8 pixels")
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Usually empty: size, channels and classes come from the dataset (``--data``).  A pinned value
    must agree with the dataset (``resize: true`` with a ``size`` resizes the images to it)."""

    size: int | tuple[int, int] | None = Field(None, description="Side or [H, W] the model sees (None: the dataset's).")
    in_channels: int | None = Field(None, ge=1, le=4)
    task: Literal["softmax", "multilabel"] | None = Field(
        None, description="From the dataset file's task (None: softmax): multilabel = overlapping classes, one "
                          "sigmoid per class.")
    num_classes: int | None = Field(None, ge=1, description="Classes including background (task multilabel: "
                                   "the foreground classes, one sigmoid output each).")
    resize: bool = False
    context: Literal["none", "partner"] = Field(
        "none", description="Extra input channels: partner = the near-duplicate frame of the same slice.")
    patch: int | tuple[int, int] | None = Field(
        None, description="Train on random crops of this side or [H, W] of the (resized or native) images; "
                          "None: whole images.")
    fg_oversample: float = Field(
        0.33, ge=0, le=1, description="With patch: share of each batch's crops centred on a foreground pixel.")

    @property
    def multilabel(self) -> bool:
        """One sigmoid output per (possibly overlapping) class, no background channel."""
        return self.task == "multilabel"

    @field_validator("num_classes")
    @classmethod
    def _classes(cls, v, info):
        if v == 1 and info.data.get("task") != "multilabel":
            raise ValueError("Input should be greater than or equal to 2 (1 class only with task multilabel)")
        return v

    @property
    def model_channels(self) -> int:
        """Input channels of the model: the image's, twice with ``context: partner``."""
        return (self.in_channels or 1) * (2 if self.context == "partner" else 1)

    @field_validator("size", "patch")
    @classmethod
    def _side(cls, v):
        return _at_least_8(v)

    @property
    def patch_hw(self) -> tuple[int, int] | None:
        """``(H, W)`` of ``patch`` (None: whole images)."""
        return hw_of(self.patch)

    @property
    def hw(self) -> tuple[int, int] | None:
        """``(H, W)`` of ``size`` (None when unset)."""
        return hw_of(self.size)

    def spec(self) -> DataSpec:
        """The folder-layout loader's spec (CMR defaults for unset values; square sizes only)."""
        d = DataSpec()
        return DataSpec(size=self.hw[0] if self.size is not None else d.size, in_channels=self.in_channels or d.in_channels,
                        num_classes=self.num_classes or d.num_classes, resize=self.resize)


class ModelConfig(_Section):
    arch: str = "Unet"
    encoder: str = "resnet34"
    weights: str = Field("imagenet", description="imagenet | none | path to .safetensors/.pth")
    input_size: int | None = Field(None, ge=8, description="Resize inputs to this side inside the model (legacy; "
                                   "prefer input_scale).")
    input_scale: float | None = Field(None, gt=0, le=8, description="Resize inputs by this factor inside the model.")
    normalize: Literal["image", "channel", "fixed"] = Field(
        "image", description="image: zero mean, unit std per image; channel: per image and channel (invariant to "
        "per-channel gain/offset, e.g. stain strength); fixed: one constant mean/std.")
    params: dict[str, Any] = Field(default_factory=dict, description="Extra smp.create_model kwargs.")
    cls_head: bool = Field(False, description="An image-level head (smp aux_params) trained on 'class present' "
                           "(BCE, loss.cls_weight); its OOF-tuned threshold can zero a class's mask (ensemble --gate).")
    cls_dropout: float = Field(0.2, ge=0, lt=1, description="Dropout before the cls head's linear layer.")


class LossConfig(_Section):
    name: Literal["dice_ce", "dice_focal", "dice", "ce", "focal", "lovasz", "lovasz_ce", "tversky", "tversky_ce"] = "dice_ce"
    dice_weight: float = Field(1.0, ge=0)
    dice_per_image: bool = Field(False, description="Dice per image and class (the metric's rows) instead of per batch.")
    ce_weight: float = Field(1.0, ge=0)
    class_weights: list[float] | None = None
    tversky_alpha: float = Field(0.5, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    cls_weight: float = Field(0.5, ge=0, description="Weight of the cls head's BCE on 'class present' (model.cls_head).")


class AugmentConfig(_Section):
    backend: Literal["auto", "albumentations", "torch"] = "auto"
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rot90: float = Field(0.0, ge=0, le=1)
    affine: float = Field(0.7, ge=0, le=1, description="Probability of a random affine.")
    rotate: float = Field(20.0, ge=0, le=180)
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = Field(0.06, ge=0, le=0.5)
    elastic: float = Field(0.0, ge=0, le=1)
    elastic_alpha: float = Field(8.0, ge=0)
    elastic_sigma: float = Field(6.0, gt=0)
    intensity: float = Field(0.5, ge=0, le=1, description="Probability of brightness/contrast jitter.")
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)
    color: float = Field(0.0, ge=0, le=1, description="Probability of per-channel (stain/colour) jitter.")
    color_gain: float = Field(0.1, ge=0, le=1, description="Each channel times 1 +- up to this.")
    color_shift: float = Field(0.05, ge=0, le=1, description="Plus up to +- this (fraction of full range) per channel.")
    gamma: float = Field(0.5, ge=0, le=1, description="Probability of a random gamma.")
    gamma_range: tuple[float, float] = (0.8, 1.25)
    noise: float = Field(0.0, ge=0, le=1, description="Probability of gaussian noise.")
    noise_std: float = Field(0.03, ge=0)

    @field_validator("scale", "gamma_range")
    @classmethod
    def _ordered(cls, v):
        if v[0] <= 0 or v[0] > v[1]:
            raise ValueError("must be (low, high) with 0 < low <= high")
        return v


class PseudoConfig(_Section):
    dir: str | None = Field(None, description="Folder written by `kagglecmr pseudo-label` (None: no pseudo labels).")
    weight: float = Field(1.0, ge=0, description="Weight of the pseudo images' loss.")
    ratio: float = Field(0.25, ge=0, lt=1, description="Share of each batch drawn from the pseudo images.")


class TrainConfig(_Section):
    epochs: int = Field(60, ge=1)
    max_steps: int | None = Field(
        None, ge=1, description="Stop a fold after this many optimiser steps (benchmarks, smoke runs); None: no cap.")
    batch_size: int = Field(16, ge=2, description="At least 2 (BatchNorm).")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(2.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="Max grad norm; 0 disables.")
    ema: float = Field(0.0, ge=0, lt=1, description="EMA decay of weights; 0 disables.")
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    channels_last: bool = True
    compile: bool = False
    cuda_graphs: bool = Field(True, description="On GPUs, replay the training step from a CUDA graph.")
    device: str = "auto"
    threads: int = Field(0, ge=0, description="CPU threads; 0 = all cores.")
    val_batch_size: int = Field(64, ge=1)
    log: list[Literal["csv", "tensorboard"]] = Field(
        default_factory=lambda: ["csv"],
        description="Per-epoch logs: metrics.csv (always written) and optionally TensorBoard events in <fold>/tb/.")
    select: Literal["best", "last", "swa"] = Field(
        "best", description="Model a fold keeps: best validation epoch, last epoch, or SWA of the last swa_epochs.")
    swa_epochs: int = Field(0, ge=0, description="Average the weights of the last N epochs (SWA); 0 = off.")
    pseudo: PseudoConfig = Field(default_factory=PseudoConfig)

    @model_validator(mode="after")
    def _swa(self):
        if self.select == "swa" and self.swa_epochs < 1:
            raise ValueError("train.select: swa needs train.swa_epochs >= 1")
        if self.swa_epochs > self.epochs:
            raise ValueError(f"train.swa_epochs {self.swa_epochs} is more than train.epochs {self.epochs}")
        return self


class TileConfig(_Section):
    """Tiled inference (``kagglecmr.engine.tiles``): images larger than the tile are predicted by overlapping
    windows whose softmax is weighted and normalised by the summed weights."""

    size: int | tuple[int, int] = Field(..., description="Tile side or [H, W].")
    overlap: float = Field(0.5, ge=0, lt=1, description="Fraction of a tile shared with the next one.")
    weight: Literal["gaussian", "constant"] = Field(
        "gaussian", description="Window weights: gaussian (sigma = tile/8, nnU-Net) or a plain average.")
    batch: int = Field(8, ge=1, description="Windows per forward pass.")

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        return _at_least_8(v)


class InferConfig(_Section):
    tta: list[Literal["none", "hflip", "vflip", "hvflip", "rot90", "rot270", "transpose", "antitranspose"]] = Field(
        default_factory=lambda: ["none", "hflip", "vflip", "hvflip"],
        description="TTA passes (kagglecmr.engine.infer): flips, and quarter turns / diagonal mirrors for rot90-trained models.")
    batch_size: int = Field(64, ge=1, description="Images per forward pass on a GPU.")
    cpu_batch_size: int = Field(8, ge=1, description="Images per forward pass on a CPU (small = cache-friendly).")
    tile: TileConfig | None = Field(
        None, description="Tiled inference {size, overlap, weight, batch}; None: tiles of data.patch when the run "
                          "trained on patches, else whole images.")

    def batch_size_for(self, device_type: str) -> int:
        """Images per forward pass on a ``torch.device.type`` (``batch_size`` on a GPU, else ``cpu_batch_size``)."""
        return self.batch_size if device_type == "cuda" else self.cpu_batch_size


class Config(_Section):
    name: str | None = None
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)

    @model_validator(mode="after")
    def _consistent(self):
        cw = self.loss.class_weights
        if cw is not None and self.data.num_classes is not None and len(cw) != self.data.num_classes:
            raise ValueError(f"loss.class_weights has {len(cw)} values, data.num_classes is {self.data.num_classes}")
        return self

    @property
    def tile(self) -> TileConfig | None:
        """The tiles inference uses: ``infer.tile``, else ``data.patch``'s size when the run trains on patches."""
        if self.infer.tile is not None:
            return self.infer.tile
        return TileConfig(size=self.data.patch) if self.data.patch is not None else None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A path as given, else a bare name looked up in ./configs, then among the shipped configs."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.parent != Path("."):
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        return p
    for folder in (Path.cwd() / LOCAL_CONFIGS, SHIPPED_CONFIGS):
        for suffix in (".yaml", ".yml"):
            cand = folder / f"{p.name}{suffix}"
            if cand.is_file():
                return cand
    if p.is_file():
        return p
    shipped = shipped_configs()
    raise ConfigError(f"{name_or_path}: no such config (shipped: {', '.join(shipped) or 'none'})")


def shipped_configs() -> list[str]:
    """Names of the configs shipped in the package (``default``, ``demo``, ...)."""
    return sorted(x.stem for x in SHIPPED_CONFIGS.glob("*.yaml"))


def _format_validation_error(src: str, err: ValidationError) -> str:
    e = err.errors()[0]
    key = ".".join(str(x) for x in e["loc"]) or "<root>"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{src}: {key}: {msg}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    for text in overrides or []:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.setdefault(k, {}), dict):
                raise ConfigError(f"--set {text}: {k} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return raw


def load_config(name_or_path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load, apply ``--set`` overrides, validate.  ``None`` gives the built-in defaults."""
    raw: dict = {}
    src = "<defaults>"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        src = str(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            raise ConfigError(f"{path}:{where} not valid YAML") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(src, err)) from None
