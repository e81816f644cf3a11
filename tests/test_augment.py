"""The batched torch augmentation (the GPU fast path) checked on CPU tensors against OpenCV and
albumentations, which the per-sample CPU pipeline uses."""

from __future__ import annotations

import math

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from albumentations.augmentations.geometric.functional import center as albu_center

from kagglecmr.cfg.config import AugmentConfig
from kagglecmr.data import augment as aug
from kagglecmr.data.augment import (
    TorchAugment,
    affine_matrix,
    augment_batch_albumentations,
    batch_affine_matrices,
    build_albumentations,
    resolve_backend,
    theta_from_pixel_matrices,
    warp,
)

H = W = 96
PROBABILITIES = ("hflip", "vflip", "rot90", "affine", "elastic", "intensity", "color", "gamma", "noise")
LABELS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


def only(**on) -> AugmentConfig:
    """Every random transform off except those given."""
    assert set(on) <= set(AugmentConfig.model_fields)
    return AugmentConfig(**{**dict.fromkeys(PROBABILITIES, 0.0), **on})


def everything(p: float = 0.5) -> AugmentConfig:
    return AugmentConfig(**dict.fromkeys(PROBABILITIES, p))


def test_probability_list_covers_the_config():
    """``only()`` must switch off every probability the config has."""
    described = {k for k, f in AugmentConfig.model_fields.items() if f.description and "robability" in f.description}
    assert described <= set(PROBABILITIES) <= set(AugmentConfig.model_fields)


def smooth_image(seed: int, h: int = H, w: int = W, sigma: float = 4.0) -> np.ndarray:
    """A float32 image in [0, 1] with structure at several scales (blurred noise)."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), sigma)
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


def blob_mask(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """Labels 0..LABELS-1 in smooth blobs (like segmentation masks)."""
    field = smooth_image(seed, h, w, sigma=6.0)
    return np.digitize(field, np.quantile(field, np.linspace(0, 1, LABELS + 1)[1:-1])).astype(np.int64)


def batch(n: int, c: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack([[smooth_image(seed + 100 * i + j) for j in range(c)] for i in range(n)]))
    y = torch.from_numpy(np.stack([blob_mask(seed + 100 * i + 7) for i in range(n)]))
    return x, y


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def torch_warp(img: np.ndarray, mask: np.ndarray | None, m: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    h, w = img.shape
    theta = theta_from_pixel_matrices(torch.tensor(m, dtype=torch.float64)[None], h, w).float()
    grid = F.affine_grid(theta, (1, 1, h, w), align_corners=False)
    xo, yo = warp(torch.from_numpy(img)[None, None], None if mask is None else torch.from_numpy(mask)[None], grid)
    return xo[0, 0].numpy(), None if yo is None else yo[0].numpy()


def source_coords(m: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel, where it samples the input (cv2's inverse map)."""
    inv = cv2.invertAffineTransform(m)
    ys, xs = np.mgrid[0:h, 0:w]
    return inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2], inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]


AFFINE_CASES = [
    (0.0, 1.0, 0.0, 0.0),
    (17.0, 1.0, 0.0, 0.0),
    (-33.0, 0.85, 3.5, -2.25),
    (90.0, 1.15, -5.0, 6.0),
    (5.0, 1.0, 0.3, 0.7),
    (-12.5, 1.07, -4.2, 1.9),
    (180.0, 0.9, 0.0, 0.0),
    (0.0, 1.1, 2.0, -3.0),
]


# ------------------------------------------------------------------------------------ affine matrices


@pytest.mark.parametrize(("angle", "scale", "tx", "ty"), AFFINE_CASES)
def test_affine_matrix_is_cv2_rotation_plus_shift(angle, scale, tx, ty):
    m = affine_matrix(angle, scale, tx, ty, H, W)
    centre = ((W - 1) / 2.0, (H - 1) / 2.0)
    ref = cv2.getRotationMatrix2D(centre, angle, scale)
    ref[:, 2] += (tx, ty)
    np.testing.assert_allclose(m, ref, atol=1e-12)
    # independent of cv2: the centre (albumentations' pixel-centre convention) moves by exactly the shift,
    # the linear part is scale * rotation (counter-clockwise on screen, y pointing down)
    cx, cy = albu_center((H, W))
    np.testing.assert_allclose(m @ [cx, cy, 1.0], [cx + tx, cy + ty], atol=1e-9)
    a = math.radians(angle)
    np.testing.assert_allclose(m[:, :2], scale * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]),
                               atol=1e-12)


def test_batch_affine_matrices_match_affine_matrix():
    g = gen(0)
    n, h, w = 64, 80, 112
    ang = torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180
    sc = torch.rand(n, generator=g, dtype=torch.float64) * 0.6 + 0.7
    tx = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 20
    ty = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 20
    mats = batch_affine_matrices(ang, sc, tx, ty, h, w)
    assert mats.shape == (n, 2, 3)
    for i in range(n):
        ref = affine_matrix(float(ang[i]), float(sc[i]), float(tx[i]), float(ty[i]), h, w)
        np.testing.assert_allclose(mats[i].numpy(), ref, atol=1e-9)
    # float32 (what TorchAugment uses) agrees to float precision
    mats32 = batch_affine_matrices(ang.float(), sc.float(), tx.float(), ty.float(), h, w)
    np.testing.assert_allclose(mats32.double().numpy(), mats.numpy(), atol=1e-4)


# ------------------------------------------------------------------------------------ warping


@pytest.mark.parametrize(("angle", "scale", "tx", "ty"), AFFINE_CASES)
def test_torch_warp_equals_cv2_warp_affine(angle, scale, tx, ty):
    img = smooth_image(1)
    m = affine_matrix(angle, scale, tx, ty, H, W)
    ref = cv2.warpAffine(img, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out, _ = torch_warp(img, None, m)
    sx, sy = source_coords(m, H, W)
    interior = (sx >= 1) & (sx <= W - 2) & (sy >= 1) & (sy <= H - 2)
    assert interior.mean() > 0.5  # the comparison covers most of the image
    diff = np.abs(out - ref)[interior]
    assert diff.max() < 2e-3, diff.max()
    # far outside the source both give the fill value
    outside = (sx < -1) | (sx > W) | (sy < -1) | (sy > H)
    assert np.all(out[outside] == 0) and np.all(ref[outside] == 0)


def test_torch_warp_integer_shift_is_exact_translation():
    img = smooth_image(2)
    tx, ty = 5, -3
    out, _ = torch_warp(img, None, affine_matrix(0.0, 1.0, tx, ty, H, W))
    expected = np.zeros_like(img)
    expected[max(ty, 0):H + min(ty, 0), max(tx, 0):W + min(tx, 0)] = img[max(-ty, 0):H - max(ty, 0), max(-tx, 0):W - max(tx, 0)]
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize(("angle", "scale", "tx", "ty"), AFFINE_CASES)
def test_mask_warp_equals_cv2_nearest(angle, scale, tx, ty):
    img, mask = smooth_image(3), blob_mask(4)
    m = affine_matrix(angle, scale, tx, ty, H, W)
    ref = cv2.warpAffine(mask.astype(np.uint8), m, (W, H), flags=cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    _, out = torch_warp(img, mask, m)
    assert out.dtype == mask.dtype
    differ = out != ref
    assert 1 - differ.mean() >= 0.99
    # the few disagreements are ties: the sample point lies exactly half way between two pixels
    sx, sy = source_coords(m, H, W)
    tie = np.minimum(np.abs(sx % 1 - 0.5), np.abs(sy % 1 - 0.5)) < 1e-6
    assert np.all(tie[differ])


def test_albumentations_affine_is_the_same_family_of_matrices():
    """Every matrix the CPU pipeline's Affine draws is ``affine_matrix`` with parameters in the configured
    ranges (isotropic scale, like TorchAugment)."""
    cfg = only(affine=1.0, rotate=25.0, scale=(0.8, 1.2), translate=0.1)
    pipe = build_albumentations(cfg, seed=3)
    (affine,) = [t for t in pipe.transforms if isinstance(t, A.Affine)]
    for _ in range(200):
        p = affine.get_params_dependent_on_data({"shape": (H, W)}, {})
        s = p["scale"]["x"]
        assert p["scale"]["y"] == s
        assert cfg.scale[0] <= s <= cfg.scale[1]
        assert abs(p["rotate"]) <= cfg.rotate
        m = p["matrix"][:2]
        lin = affine_matrix(p["rotate"], s, 0.0, 0.0, H, W)
        np.testing.assert_allclose(m[:, :2], lin[:, :2], atol=1e-9)
        tx, ty = m[:, 2] - lin[:, 2]
        assert abs(tx) <= cfg.translate * W + 1e-9 and abs(ty) <= cfg.translate * H + 1e-9


def test_albumentations_affine_output_equals_torch_warp_with_its_matrix():
    cfg = only(affine=1.0)
    pipe = A.Compose(build_albumentations(cfg).transforms, save_applied_params=True, seed=5)
    img = (smooth_image(6) * 255).round().astype(np.uint8)
    mask = blob_mask(7).astype(np.uint8)
    r = pipe(image=img[..., None], mask=mask)
    ((name, params),) = r["applied_transforms"]
    assert name == "Affine"
    m = params["matrix"][:2]
    out, out_mask = torch_warp(img.astype(np.float32) / 255, mask.astype(np.int64), m)
    sx, sy = source_coords(m, H, W)
    interior = (sx >= 1) & (sx <= W - 2) & (sy >= 1) & (sy <= H - 2)
    diff = np.abs(out * 255 - r["image"][..., 0].astype(np.float32))[interior]
    assert diff.max() <= 1.0 + 1e-3  # uint8 rounding
    assert (out_mask == r["mask"]).mean() >= 0.99


# ------------------------------------------------------------------------------------ TorchAugment: geometry


def test_everything_off_is_identity():
    x, y = batch(4, c=2)
    xo, yo = TorchAugment(only())(x, y, gen(0))
    assert torch.equal(xo, x) and torch.equal(yo, y)


@pytest.mark.parametrize(("name", "dim"), [("hflip", -1), ("vflip", -2)])
def test_flip_with_probability_one(name, dim):
    x, y = batch(4, c=2)
    xo, yo = TorchAugment(only(**{name: 1.0}))(x, y, gen(0))
    assert torch.equal(xo, x.flip(dim))
    assert torch.equal(yo, y.flip(dim))


def test_geometric_transforms_move_image_and_mask_together():
    x, y = batch(16)
    x = y[:, None].float() / (LABELS - 1)  # the image is the mask: both must move identically
    xo, yo = TorchAugment(only(hflip=0.5, vflip=0.5, rot90=0.5))(x, y, gen(1))
    assert torch.equal(xo[:, 0] * (LABELS - 1), yo.float())
    xo, yo = TorchAugment(only(affine=1.0))(x, y, gen(2))
    agree = (xo[:, 0] * (LABELS - 1) - yo.float()).abs() < 0.5
    assert agree.float().mean() > 0.95


def test_affine_parameters_drawn_in_configured_ranges(monkeypatch):
    cfg = only(affine=0.7, rotate=15.0, scale=(0.9, 1.2), translate=0.05)
    seen = {}

    def spy(angle, scale, tx, ty, h, w):
        seen.update(angle=angle, scale=scale, tx=tx, ty=ty)
        return batch_affine_matrices(angle, scale, tx, ty, h, w)

    monkeypatch.setattr(aug, "batch_affine_matrices", spy)
    n = 2000
    x = torch.zeros(n, 1, 8, 8)
    y = torch.zeros(n, 8, 8, dtype=torch.long)
    TorchAugment(cfg)(x, y, gen(3))
    on = (seen["angle"] != 0) | (seen["scale"] != 1) | (seen["tx"] != 0) | (seen["ty"] != 0)
    assert abs(on.float().mean().item() - cfg.affine) < 5 * math.sqrt(cfg.affine * (1 - cfg.affine) / n)
    assert seen["angle"].abs().max() <= cfg.rotate
    assert cfg.scale[0] <= seen["scale"].min() and seen["scale"].max() <= cfg.scale[1]
    assert seen["tx"].abs().max() <= cfg.translate * 8 + 1e-6 and seen["ty"].abs().max() <= cfg.translate * 8 + 1e-6
    # the whole range is used, not a corner of it
    assert seen["angle"][on].min() < -0.9 * cfg.rotate and seen["angle"][on].max() > 0.9 * cfg.rotate
    assert seen["scale"][on].min() < cfg.scale[0] + 0.05 * (cfg.scale[1] - cfg.scale[0])


# ------------------------------------------------------------------------------------ intensity


def fit_line(x: torch.Tensor, out: torch.Tensor) -> tuple[float, float, float]:
    """Least squares ``out = alpha * x + beta`` on the pixels that were not clipped; returns the residual."""
    keep = (out > 1e-6) & (out < 1 - 1e-6)
    xs, ys = x[keep].double(), out[keep].double()
    a = torch.stack([xs, torch.ones_like(xs)], 1)
    sol = torch.linalg.lstsq(a, ys[:, None]).solution[:, 0]
    alpha, beta = float(sol[0]), float(sol[1])
    return alpha, beta, float((a @ sol - ys).abs().max())


def test_intensity_is_clipped_linear_map_in_configured_range():
    cfg = only(intensity=1.0, brightness=0.3, contrast=0.1)  # unequal: a swap would show
    x, y = batch(64)
    xo, yo = TorchAugment(cfg)(x, y, gen(4))
    assert torch.equal(yo, y)
    alphas, betas = [], []
    for i in range(len(x)):
        alpha, beta, resid = fit_line(x[i], xo[i])
        assert resid < 1e-5
        assert 1 - cfg.contrast - 1e-5 <= alpha <= 1 + cfg.contrast + 1e-5
        assert -cfg.brightness - 1e-5 <= beta <= cfg.brightness + 1e-5
        torch.testing.assert_close(xo[i], (x[i] * alpha + beta).clamp(0, 1), atol=1e-5, rtol=0)
        alphas.append(alpha)
        betas.append(beta)
    # per-sample parameters spread over the range
    assert max(alphas) - min(alphas) > 1.6 * cfg.contrast and max(betas) - min(betas) > 1.6 * cfg.brightness


def test_gamma_is_a_power_in_configured_range():
    cfg = only(gamma=1.0, gamma_range=(0.8, 1.6))  # not symmetric under 1/g
    x, y = batch(32)
    xo, _ = TorchAugment(cfg)(x, y, gen(5))
    gammas = []
    for i in range(len(x)):
        keep = (x[i] > 0.05) & (x[i] < 0.95)
        lx, lo = torch.log(x[i][keep].double()), torch.log(xo[i][keep].double())
        g = float((lx * lo).sum() / (lx * lx).sum())
        assert cfg.gamma_range[0] - 1e-4 <= g <= cfg.gamma_range[1] + 1e-4
        torch.testing.assert_close(xo[i], x[i] ** g, atol=1e-4, rtol=0)
        gammas.append(g)
    assert max(gammas) - min(gammas) > 0.5 * (cfg.gamma_range[1] - cfg.gamma_range[0])


def test_albumentations_brightness_contrast_is_the_same_formula():
    cfg = only(intensity=1.0, brightness=0.3, contrast=0.1)  # unequal: a swap would show
    pipe = build_albumentations(cfg, seed=0)
    (t,) = pipe.transforms
    assert isinstance(t, A.RandomBrightnessContrast)
    assert tuple(t.brightness_limit) == (-cfg.brightness, cfg.brightness)
    assert tuple(t.contrast_limit) == (-cfg.contrast, cfg.contrast)
    img = (smooth_image(8) * 255).round().astype(np.uint8)[..., None]
    x = torch.from_numpy(img[..., 0].astype(np.float32) / 255)
    # its apply(img, alpha, beta) with beta in pixel units is TorchAugment's clip(x * alpha + beta)
    for alpha, beta in [(1.2, 0.1), (0.75, -0.2), (1.3, 0.25), (1.0, 0.0)]:
        ref = t.apply(img, alpha=alpha, beta=beta * 255)[..., 0].astype(np.float32)
        ours = (x * alpha + beta).clamp(0, 1).numpy() * 255
        assert np.abs(ref - ours).max() <= 1.0 + 1e-3
    # and what it draws per call fits that formula with parameters in the configured range
    for _ in range(10):
        out = torch.from_numpy(pipe(image=img)["image"][..., 0].astype(np.float32) / 255)
        alpha, beta, resid = fit_line(x, out)
        assert resid <= 1.5 / 255
        assert 1 - cfg.contrast - 0.01 <= alpha <= 1 + cfg.contrast + 0.01
        assert -cfg.brightness - 0.01 <= beta <= cfg.brightness + 0.01


def per_channel_lines(x: torch.Tensor, out: torch.Tensor) -> list[tuple[float, float, float]]:
    """``fit_line`` per channel of ``[C, H, W]`` tensors, on pixels the gain cannot push past 1 (both
    implementations clip after the gain and again after the shift, as uint8 arithmetic does)."""
    keep = x < 0.85
    return [fit_line(x[ch][keep[ch]], out[ch][keep[ch]]) for ch in range(x.shape[0])]


def test_color_jitter_is_a_clipped_linear_map_per_channel():
    cfg = only(color=1.0, color_gain=0.15, color_shift=0.05)  # unequal: a swap would show
    x = torch.from_numpy(np.stack([[smooth_image(s), smooth_image(s + 50)] for s in range(32)]))  # [B, 2, H, W]
    y = torch.zeros(len(x), H, W, dtype=torch.long)
    xo, yo = TorchAugment(cfg)(x, y, gen(7))
    assert torch.equal(yo, y)
    gains, shifts, differ = [], [], 0
    for i in range(len(x)):
        lines = per_channel_lines(x[i], xo[i])
        for gain, shift, resid in lines:
            assert resid < 1e-5
            assert 1 - cfg.color_gain - 1e-5 <= gain <= 1 + cfg.color_gain + 1e-5
            assert -cfg.color_shift - 1e-5 <= shift <= cfg.color_shift + 1e-5
            gains.append(gain)
            shifts.append(shift)
        differ += abs(lines[0][0] - lines[1][0]) > 1e-3  # channels drawn independently
    assert differ > 0.8 * len(x)
    assert max(gains) - min(gains) > 1.6 * cfg.color_gain and max(shifts) - min(shifts) > 1.6 * cfg.color_shift
    # probability 0.5: about half of the images are untouched
    xo, _ = TorchAugment(only(color=0.5))(x, y, gen(8))
    untouched = sum(torch.equal(xo[i], x[i]) for i in range(len(x)))
    assert 6 <= untouched <= 26


def test_albumentations_color_jitter_is_the_same_formula():
    cfg = only(color=1.0, color_gain=0.15, color_shift=0.05)
    pipe = build_albumentations(cfg, seed=1)
    (t,) = pipe.transforms
    assert t.p == 1.0
    img = (np.stack([smooth_image(10), smooth_image(11)], -1) * 255).round().astype(np.uint8)  # [H, W, 2]
    x = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255)
    gains, differ = [], 0
    for _ in range(12):
        out = torch.from_numpy(pipe(image=img)["image"].transpose(2, 0, 1).astype(np.float32) / 255)
        lines = per_channel_lines(x, out)
        for gain, shift, resid in lines:
            assert resid <= 2.0 / 255
            assert 1 - cfg.color_gain - 0.01 <= gain <= 1 + cfg.color_gain + 0.01
            assert -cfg.color_shift - 0.01 <= shift <= cfg.color_shift + 0.01
            gains.append(gain)
        differ += abs(lines[0][0] - lines[1][0]) > 1e-3
    assert differ >= 9 and max(gains) - min(gains) > cfg.color_gain
    assert not build_albumentations(only()).transforms  # off: nothing in the pipeline


def test_albumentations_gamma_is_the_same_formula():
    cfg = only(gamma=1.0, gamma_range=(0.8, 1.6))  # not symmetric under 1/g
    (t,) = build_albumentations(cfg).transforms
    assert isinstance(t, A.RandomGamma)
    assert tuple(t.gamma_limit) == pytest.approx((cfg.gamma_range[0] * 100, cfg.gamma_range[1] * 100))
    img = (smooth_image(9) * 255).round().astype(np.uint8)[..., None]
    x = torch.from_numpy(img[..., 0].astype(np.float32) / 255)
    for g in (*cfg.gamma_range, 1.0):
        ref = t.apply(img, gamma=g)[..., 0].astype(np.float32)
        assert np.abs(ref - (x**g).numpy() * 255).max() <= 1.0 + 1e-3


# ------------------------------------------------------------------------------------ distributions


def flipped_fraction_torch(cfg: AugmentConfig, n: int, dim: int) -> float:
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4).expand(n, 1, 4, 4).contiguous() / 15
    y = torch.zeros(n, 4, 4, dtype=torch.long)
    xo, _ = TorchAugment(cfg)(x, y, gen(6))
    return (xo == x.flip(dim)).flatten(1).all(1).float().mean().item()


def flipped_fraction_albumentations(cfg: AugmentConfig, n: int, axis: int) -> float:
    pipe = build_albumentations(cfg, seed=6)
    img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    mask = np.zeros((4, 4), np.uint8)
    flipped = np.flip(img, axis)
    return float(np.mean([np.array_equal(pipe(image=img, mask=mask)["image"], flipped) for _ in range(n)]))


@pytest.mark.parametrize(("name", "dim", "axis"), [("hflip", -1, 1), ("vflip", -2, 0)])
@pytest.mark.parametrize("p", [0.3, 0.5])
def test_flip_frequency_matches_configured_probability_in_both_backends(name, dim, axis, p):
    cfg = only(**{name: p})
    n_torch, n_albu = 20000, 2000
    ft = flipped_fraction_torch(cfg, n_torch, dim)
    fa = flipped_fraction_albumentations(cfg, n_albu, axis)
    assert abs(ft - p) < 5 * math.sqrt(p * (1 - p) / n_torch)
    assert abs(fa - p) < 5 * math.sqrt(p * (1 - p) / n_albu)


def test_rot90_distribution_matches_albumentations():
    """Both draw a quarter-turn count in 0..3 when the transform fires (albumentations' RandomRotate90)."""
    p, n = 0.6, 2000
    cfg = only(rot90=p)
    base = np.arange(16, dtype=np.float32).reshape(4, 4)
    turned = [np.rot90(base, k) for k in range(4)]  # np.rot90 and torch.rot90 turn the same way

    def which(a: np.ndarray) -> int:
        (k,) = [k for k in range(4) if np.array_equal(a, turned[k])]
        return k

    xo, _ = TorchAugment(cfg)(torch.from_numpy(base).expand(n, 1, 4, 4).contiguous(),
                              torch.zeros(n, 4, 4, dtype=torch.long), gen(7))
    counts_t = np.bincount([which(a[0].numpy()) for a in xo], minlength=4) / n
    pipe = build_albumentations(cfg, seed=7)
    img = base.astype(np.uint8)[..., None]
    counts_a = np.bincount([which(pipe(image=img)["image"][..., 0].astype(np.float32)) for _ in range(n)],
                           minlength=4) / n
    expected = np.array([1 - p + p / 4, p / 4, p / 4, p / 4])
    tol = 5 * np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(counts_t - expected) < tol), counts_t
    assert np.all(np.abs(counts_a - expected) < tol), counts_a


# ------------------------------------------------------------------------------------ determinism


def test_torch_augment_is_deterministic_per_generator_seed():
    x, y = batch(8, c=2)
    t = TorchAugment(everything(0.7))
    a = t(x, y, gen(11))
    b = t(x, y, gen(11))
    c = t(x, y, gen(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_albumentations_pipeline_is_deterministic_per_seed():
    x, y = batch(6)
    images = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    masks = y.numpy().astype(np.uint8)
    cfg = everything(0.7)
    a = augment_batch_albumentations(build_albumentations(cfg, seed=3), images, masks)
    b = augment_batch_albumentations(build_albumentations(cfg, seed=3), images, masks)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    pipe = build_albumentations(cfg)
    pipe.set_random_seed(21)
    c = augment_batch_albumentations(pipe, images, masks)
    pipe.set_random_seed(21)
    d = augment_batch_albumentations(pipe, images, masks)
    assert np.array_equal(c[0], d[0]) and np.array_equal(c[1], d[1])
    assert not np.array_equal(a[0], c[0])


# ------------------------------------------------------------------------------------ invariants


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.uint8])
@pytest.mark.parametrize("channels", [1, 3])
def test_torch_augment_keeps_labels_dtypes_shapes_and_range(mask_dtype, channels):
    x, y = batch(12, c=channels)
    y = y.to(mask_dtype)
    labels = set(y.unique().tolist()) | {0}
    t = TorchAugment(everything(0.8))
    for seed in range(3):
        xo, yo = t(x, y, gen(seed))
        assert xo.shape == x.shape and yo.shape == y.shape
        assert xo.dtype == x.dtype and yo.dtype == mask_dtype
        assert set(yo.unique().tolist()) <= labels
        assert xo.min() >= 0 and xo.max() <= 1
        assert torch.isfinite(xo).all()
        assert not torch.equal(xo, x)


def test_albumentations_keeps_labels_dtypes_shapes_and_range():
    x, y = batch(8)
    images = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    masks = y.numpy().astype(np.uint8)
    labels = set(np.unique(masks).tolist()) | {0}
    out_i, out_m = augment_batch_albumentations(build_albumentations(everything(0.8), seed=0), images, masks)
    assert out_i.shape == images.shape and out_m.shape == masks.shape
    assert out_i.dtype == np.uint8 and out_m.dtype == np.uint8
    assert set(np.unique(out_m).tolist()) <= labels
    assert not np.array_equal(out_i, images)


def test_resolve_backend():
    assert resolve_backend(AugmentConfig(), torch.device("cpu")) == "albumentations"
    assert resolve_backend(AugmentConfig(), torch.device("cuda")) == "torch"
    for b in ("torch", "albumentations"):
        assert resolve_backend(AugmentConfig(backend=b), torch.device("cpu")) == b


@pytest.mark.parametrize("backend", ["torch", "albumentations"])
def test_ignore_label_255_survives_augmentation_and_the_border_fills_with_background(backend):
    """Pseudo-label masks carry 255 (ignore): nearest-neighbour warps keep it, never blend it into a
    class, and pixels shifted in from outside the image are background (0), not ignore."""
    cfg = AugmentConfig(hflip=0.5, vflip=0.5, affine=1.0, rotate=30, translate=0.2, elastic=0.5,
                        intensity=0.0, gamma=0.0)
    masks = np.zeros((8, 32, 32), np.uint8)
    masks[:, 4:28, 4:28] = 255  # ignore region reaching near the border
    masks[:, 12:20, 12:20] = 3
    images = (np.random.default_rng(0).random((8, 32, 32, 1)) * 255).astype(np.uint8)
    if backend == "torch":
        g = torch.Generator().manual_seed(0)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        _, y = TorchAugment(cfg)(x, torch.from_numpy(masks).long(), g)
        out = y.numpy()
    else:
        _, out = aug.augment_batch_albumentations(aug.build_albumentations(cfg, seed=0), images, masks)
    assert set(np.unique(out)) <= {0, 3, 255}
    assert (out == 255).sum() > 0 and (out == 3).sum() > 0
    assert (out == 0).sum() > (masks == 0).sum()  # translated/rotated: background filled in at the border
