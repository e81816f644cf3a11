"""``kc.load_ensemble(...).predict_proba`` on images of any size and type, and ``kagglecmr predict``."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from conftest import copy_run, tree_snapshot

import kagglecmr as kc
from kagglecmr.engine.ensembler import predict_images
from kagglecmr.engine.mask_files import overlay_contours
from kagglecmr.utils.errors import KaggleCMRError

RAW = {"0": 0, "60": 1, "120": 2, "250": 3}  # a dataset whose masks are stored as 0/60/120/250


@pytest.fixture(scope="module")
def model(project):
    return kc.load_ensemble(project.run, tta_flips=["none", "hflip"], device="cpu")


@pytest.fixture(scope="module")
def test_images(project):
    paths = sorted((project.data / "test" / "image").glob("*.png"))
    return [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths[:3]]


def test_same_size_batch_equals_the_ensemble(model, test_images, one_torch_thread):
    batch = np.stack(test_images)  # [N, H, W] grey
    probs = model.predict_proba(batch)
    ref = predict_images(model.runs, batch[..., None], torch.device("cpu"), ["none", "hflip"], model.weights,
                         model.batch_size)
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32 and probs.shape == (3, 4, 96, 96)
    np.testing.assert_array_equal(probs, ref.astype(np.float32))
    np.testing.assert_array_equal(model.predict(batch), ref.argmax(1))
    np.testing.assert_array_equal(model.predict_proba(list(batch)), probs)  # a list of equal sizes: an array too


def test_mixed_sizes_types_and_channels(model, test_images, one_torch_thread):
    grey = test_images[0]
    small = cv2.resize(test_images[1], (80, 64), interpolation=cv2.INTER_AREA)
    rgb = np.repeat(grey[..., None], 3, axis=2)  # a colour PNG of a grey image
    deep = grey.astype(np.uint16) * 257  # 16-bit
    probs = model.predict_proba([grey, small, rgb, deep])
    assert isinstance(probs, list) and [p.shape for p in probs] == [(4, 96, 96), (4, 64, 80), (4, 96, 96), (4, 96, 96)]
    for p in probs:
        assert p.dtype == np.float32
        np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs[2], probs[0])
    np.testing.assert_array_equal(probs[3], probs[0])
    # the small image is predicted at the trained size and its probabilities resized back
    up = cv2.resize(small, (96, 96), interpolation=cv2.INTER_LINEAR)
    at96 = model.predict_proba(up[None])[0]
    back = cv2.resize(at96.transpose(1, 2, 0), (80, 64), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    np.testing.assert_allclose(probs[1], back, atol=1e-5)  # (batch composition: float rounding)
    labels = model.predict([grey, small])
    assert [m.shape for m in labels] == [(96, 96), (64, 80)] and labels[1].dtype == np.uint8


def test_bad_inputs_are_one_line_errors(model):
    with pytest.raises(KaggleCMRError, match="pixel type complex128"):  # (floats are stretched like 16-bit)
        model.predict_proba([np.zeros((10, 10), complex)])
    with pytest.raises(KaggleCMRError, match="expected \\[N, H, W\\]"):
        model.predict_proba(np.zeros((10, 10), np.uint8))
    with pytest.raises(KaggleCMRError, match="run folder not found"):
        kc.load_ensemble("no/such/run")


def _png_folder(folder, project):
    folder.mkdir()
    src = sorted((project.data / "test" / "image").glob("*.png"))
    grey = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in src[:3]]
    cv2.imwrite(str(folder / "a.png"), grey[0])
    cv2.imwrite(str(folder / "b.png"), cv2.resize(grey[1], (120, 72)))
    cv2.imwrite(str(folder / "c.png"), cv2.cvtColor(cv2.resize(grey[2], (50, 60)), cv2.COLOR_GRAY2BGR))
    cv2.imwrite(str(folder / "d.png"), cv2.resize(grey[0], (100, 100)).astype(np.uint16) * 257)
    return {"a": (96, 96), "b": (72, 120), "c": (60, 50), "d": (100, 100)}


def test_predict_folder_of_mixed_sizes_in_the_datasets_values(project, tmp_path, main_cli, assert_cli_error):
    sizes = _png_folder(tmp_path / "in", project)
    run = copy_run(project.run, tmp_path / "runs" / "raw", slim=True)
    (run / "fold0" / "dataset.json").write_text(json.dumps({"mask_values": RAW, "in_channels": 1}))
    out = tmp_path / "out"
    proc = main_cli("predict", tmp_path / "in", "--runs", run, "--out", out, "--overlay", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "4 images" in proc.stdout
    model = kc.load_ensemble(run, device="cpu")
    for stem, hw in sizes.items():
        mask = cv2.imread(str(out / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == hw and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 60, 120, 250}
        img = cv2.imread(str(tmp_path / "in" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        img = img[..., ::-1] if img.ndim == 3 else img
        expect = np.array([0, 60, 120, 250], np.uint8)[model.predict([img])[0]]
        np.testing.assert_array_equal(mask, expect)
        ov = cv2.imread(str(out / f"{stem}_overlay.png"))
        assert ov.shape == (*hw, 3)
    assert len(list(out.iterdir())) == 8

    before = tree_snapshot(out)
    proc = main_cli("predict", tmp_path / "in" / "a.png", "--runs", run, "--out", out, "--device", "cpu")
    assert_cli_error(proc, "a.png", "already exists", "--force")
    assert tree_snapshot(out) == before
    proc = main_cli("predict", tmp_path / "in" / "a.png", "--runs", run, "--out", out, "--device", "cpu", "--force")
    assert proc.returncode == 0, proc.stderr


def test_predict_without_dataset_json_writes_class_numbers(project, tmp_path):
    _png_folder(tmp_path / "in", project)
    res = kc.predict([tmp_path / "in" / "b.png", tmp_path / "in" / "c.png"], runs=project.run, out=tmp_path / "o",
                     device="cpu")
    assert [p.name for p in res.masks] == ["b.png", "c.png"] and res.overlays == []
    for path, lab in zip(res.masks, res.labels):
        np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), lab)
        assert lab.max() < 4


@pytest.mark.parametrize("case", ["not_png", "corrupt", "missing", "empty_dir"])
def test_predict_input_errors(project, tmp_path, main_cli, assert_cli_error, case):
    target = tmp_path / "x.png"
    if case == "not_png":
        target = tmp_path / "x.jpg"
        target.write_bytes(b"jpeg")
    elif case == "corrupt":
        good = cv2.imencode(".png", np.zeros((20, 20), np.uint8))[1].tobytes()
        target.write_bytes(good[:40])
    elif case == "empty_dir":
        target = tmp_path / "empty"
        target.mkdir()
    proc = main_cli("predict", target, "--runs", project.run, "--out", tmp_path / "out", "--device", "cpu")
    assert_cli_error(proc, target.name)
    assert not (tmp_path / "out").exists()


def test_overlay_draws_colour_images_in_true_colours():
    img = np.zeros((40, 40, 3), np.uint8)
    img[..., 0] = 200  # red tissue (RGB)
    labels = np.zeros((40, 40), np.uint8)
    labels[10:30, 10:30] = 1
    bgr = overlay_contours(img, labels)
    assert tuple(bgr[2, 2]) == (0, 0, 200)  # far from the outline: the image's own red, in BGR order
    assert tuple(bgr[20, 20]) == (0, 0, 200)  # inside: not painted over
    edge = bgr[10, 10:30]
    assert any(tuple(px) != (0, 0, 200) for px in edge)  # the outline is drawn


def test_prepare_image_keeps_the_datasets_channels():
    """dataset.json ``channels`` (RGB order) selects the source channels, e.g. R and B of an RGB image."""
    import numpy as np

    from kagglecmr.engine.predictor import prepare_image

    img = np.zeros((8, 10, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 20, 30
    assert prepare_image(img, 2, (8, 10), keep=[0, 2])[0, 0].tolist() == [10, 30]
    assert prepare_image(img, 2, (8, 10), keep=[0, 1])[0, 0].tolist() == [10, 20]
    assert prepare_image(img, 2, (8, 10))[0, 0].tolist() == [10, 20]  # no list: the first two, as before
    assert prepare_image(img[..., :2], 2, (4, 5), keep=[0, 1]).shape == (4, 5, 2)  # already the kept channels


def test_select_last_predicts_with_every_folds_last_checkpoint(project, tmp_path, main_cli, assert_cli_error,
                                                                test_images, one_torch_thread):
    """``predict --select last`` (and ``load_ensemble(select=...)``, which ``export`` shares) predicts with the
    ``last.safetensors`` of every fold, as ``ensemble --select last`` scores them; unknown names are refused."""
    from kagglecmr.engine.ensembler import load_run

    batch = np.stack(test_images)
    last = kc.load_ensemble(project.run, device="cpu", select="last")
    assert [list(r.kept.values()) for r in last.runs] == [[f"fold{k}/last.safetensors" for k in range(5)]]
    ref = predict_images([load_run(project.run, torch.device("cpu"), select="last")], batch[..., None],
                         torch.device("cpu"), ["none"], np.ones(1), 8)
    np.testing.assert_array_equal(last.predict_proba(batch), ref.astype(np.float32))
    best = kc.load_ensemble(project.run, device="cpu")
    assert list(best.runs[0].kept.values()) == [f"fold{k}/best.safetensors" for k in range(5)]
    assert not np.array_equal(best.predict_proba(batch), last.predict_proba(batch))  # the two checkpoints differ

    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), test_images[0])
    run = copy_run(project.run, tmp_path / "runs" / "r", slim=True)
    proc = main_cli("predict", src, "--runs", run, "--out", tmp_path / "out", "--device", "cpu", "--select", "last")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "out" / "a.png"), cv2.IMREAD_UNCHANGED),
                                  last.to_raw(last.predict(test_images[:1]))[0])
    proc = main_cli("predict", src, "--runs", run, "--out", tmp_path / "out2", "--device", "cpu", "--select", "swa")
    assert_cli_error(proc, "swa.safetensors", "train.swa_epochs")
    assert not (tmp_path / "out2").exists()
