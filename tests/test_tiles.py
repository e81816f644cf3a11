"""Tiled inference (kagglecmr.engine.tiles): windows cover every pixel exactly as planned, and a model with a
one-pixel receptive field (1x1 convolutions) gives through the tiler its full-image prediction, with gaussian
and constant weights, on sizes that are not multiples of the tile or step (3000x4000 included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kagglecmr.engine.tiles import as_hw, needs_tiles, predict_tiled, window_starts, window_weight
from kagglecmr.utils.errors import ConfigError


def _pointwise_model(channels: int = 3, classes: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, classes, 1)).eval()


def _softmax_fn(model):
    @torch.inference_mode()
    def predict(windows: np.ndarray) -> np.ndarray:  # uint8 [n, h, w, C] -> float32 [n, K, h, w]
        x = torch.from_numpy(windows).permute(0, 3, 1, 2).float() / 255.0
        return torch.softmax(model(x), dim=1).numpy()
    return predict


@pytest.mark.parametrize(("length", "tile", "overlap", "expected"), [
    (10, 16, 0.5, [0]), (16, 16, 0.5, [0]), (17, 16, 0.5, [0, 1]), (40, 16, 0.5, [0, 8, 16, 24]),
    (41, 16, 0.5, [0, 8, 16, 24, 25]), (41, 16, 0.0, [0, 16, 25]), (100, 30, 0.25, [0, 22, 44, 66, 70]),
])
def test_window_starts_cover_every_pixel_and_end_at_the_border(length, tile, overlap, expected):
    starts = window_starts(length, tile, overlap)
    assert starts == expected
    covered = np.zeros(max(length, tile), bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered[:length].all() and max(starts) + tile == max(length, tile)


def test_bad_tile_settings_are_config_errors():
    with pytest.raises(ConfigError):
        window_starts(100, 10, 1.0)
    with pytest.raises(ConfigError):
        window_weight((8, 8), "cosine")
    with pytest.raises(ConfigError):
        as_hw([0, 8])
    assert as_hw(256) == (256, 256) and as_hw([128, 64]) == (128, 64)
    assert needs_tiles((300, 200), 256) and not needs_tiles((256, 100), 256)


def test_gaussian_weight_peaks_in_the_centre_and_never_reaches_zero():
    w = window_weight((32, 48), "gaussian")
    assert w.shape == (32, 48) and w.dtype == np.float32 and not w.flags.writeable
    assert w.max() == pytest.approx(1.0, abs=1e-3) and w.min() > 0
    assert w[16, 24] > w[16, 40] > w[16, 47] and np.allclose(w, w[::-1, ::-1])
    assert (window_weight((8, 8), "constant") == 1).all()


@pytest.mark.parametrize("weight", ["gaussian", "constant"])
@pytest.mark.parametrize(("hw", "tile", "overlap"), [((37, 53), 16, 0.5), ((96, 96), 32, 0.25), ((10, 70), 32, 0.5),
                                                    ((129, 65), [64, 32], 0.5)])
def test_pointwise_model_tiled_equals_full_image(weight, hw, tile, overlap):
    model = _pointwise_model()
    predict = _softmax_fn(model)
    image = np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)
    full = predict(image[None])[0]
    tiled = predict_tiled(predict, image, tile, overlap=overlap, weight=weight, batch=3)
    assert tiled.shape == full.shape and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, full, rtol=1e-5, atol=1e-6)
    assert np.array_equal(tiled.argmax(0), full.argmax(0))


@pytest.mark.slow
@pytest.mark.parametrize("weight", ["gaussian", "constant"])
def test_pointwise_model_tiled_equals_full_image_at_3000x4000(weight):
    model = _pointwise_model(channels=1, classes=3)
    predict = _softmax_fn(model)
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (3000, 4000, 1), dtype=np.uint8)
    full = np.concatenate([predict(image[None, y:y + 500])[0] for y in range(0, 3000, 500)], axis=1)  # rows: cheap
    tiled = predict_tiled(predict, image, 768, overlap=0.5, weight=weight, batch=4)
    np.testing.assert_allclose(tiled, full, rtol=1e-5, atol=1e-6)
    assert np.array_equal(tiled.argmax(0), full.argmax(0))


def test_a_model_with_context_differs_at_window_borders_but_the_weights_favour_centres():
    """With a real receptive field (a 5x5 box filter) windows disagree near their borders; the gaussian
    weighting is closer to the full-image result than a plain average."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 2, 5, padding=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
    predict = _softmax_fn(conv.eval())
    image = np.random.default_rng(3).integers(0, 256, (90, 90, 1), dtype=np.uint8)
    full = predict(image[None])[0]
    err = {w: np.abs(predict_tiled(predict, image, 24, overlap=0.5, weight=w) - full).mean() for w in ("gaussian",
                                                                                                     "constant")}
    assert 0 < err["gaussian"] < err["constant"]


def test_predict_window_of_the_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match="predict_window returned shape"):
        predict_tiled(lambda w: np.zeros((len(w), 2, 4, 4), np.float32), np.zeros((20, 20, 1), np.uint8), 8)


@pytest.mark.slow
def test_patch_trained_unet_tiled_and_full_image_agree_on_large_images(tmp_path, main_cli):
    """A small Unet trained on 96-px patches of 256-px phantoms (data.patch: 96): its gaussian-weighted tiles
    (the default tile = patch, half overlap) and its whole-image prediction agree on >= 99 % of the pixels'
    classes of held-out 256-px images (measured 0.9925).  With fixed input normalisation: under the default
    per-image z-score each window is normalised on its own, as its training patches were, and the whole image
    once, so the two differ by design (measured 0.85) and tiles are the consistent prediction."""
    from kagglecmr.data.dataset import load_dataset
    from kagglecmr.engine.ensembler import load_run
    from kagglecmr.engine.infer import predict_proba, predict_proba_tiled

    data = tmp_path / "big"
    assert main_cli("demo-data", data, "--n-train", 30, "--n-val", 0, "--n-test", 4, "--size", 256).returncode == 0
    proc = main_cli("make-folds", "--data", data, "--out", tmp_path / "folds.csv", "--allow-unbalanced")
    assert proc.returncode == 0, proc.stderr
    proc = main_cli("train", "--fold", "0", "--config", "demo", "--data", data, "--folds", tmp_path / "folds.csv",
                    "--runs-dir", tmp_path / "runs", "--name", "p", "--quiet", "--device", "cpu",
                    "--set", "data.patch=96", "--set", "train.epochs=12", "--set", "train.batch_size=8",
                    "--set", "model.normalize=fixed")
    assert proc.returncode == 0, proc.stderr
    run = load_run(tmp_path / "runs" / "p", torch.device("cpu"))
    assert run.cfg.tile is not None and run.cfg.tile.size == 96
    images = load_dataset(data).load("test", labelled=False).images  # [4, 256, 256, 1]
    full = predict_proba(run.models[0], images, torch.device("cpu"), batch_size=2)
    tiled = predict_proba_tiled(run.models[0], images, torch.device("cpu"), tile=run.cfg.tile)
    agree = float((full.argmax(1) == tiled.argmax(1)).mean())
    print(f"patch-trained Unet, 4 held-out 256x256 images: tiled vs full-image class agreement {agree:.4f}")
    assert agree >= 0.99
