"""``kagglecmr export`` of a run that predicts by tiles: the file holds the per-tile ensemble, ``FILE.json`` the tile
settings, and ``load_export`` stitches larger images as ``ensemble`` does (onnx and TorchScript).

A patch-trained (``data.patch: 48``) one-fold run on 96-px phantoms: its trained size is predicted by 3x3 windows.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_YAML

import kagglecmr as kc
from kagglecmr.cfg.config import Config, TileConfig
from kagglecmr.data.demo import make_demo_dataset
from kagglecmr.data.folds import run_make_folds
from kagglecmr.engine.ensembler import predict_images
from kagglecmr.engine.exporter import TOLERANCE, export_tile
from kagglecmr.engine.infer import predict_proba
from kagglecmr.engine.orchestrate import run_train
from kagglecmr.utils.errors import KaggleCMRError

FLIPS = ["none", "hflip"]
TILE = {"size": [48, 48], "overlap": 0.5, "weight": "gaussian", "batch": 8}


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled")
    make_demo_dataset(root / "data", n_train=8, n_val=0, n_test=2, seed=3)
    run_make_folds(root / "data", n_folds=2, seed=0, out=root / "folds.csv")
    raw = yaml.safe_load(TINY_YAML)
    raw["data"]["patch"] = 48
    raw["train"].update(epochs=1, batch_size=4)
    run_train(Config.model_validate(raw), fold_spec="0", data_root=root / "data", folds_path=root / "folds.csv",
              name="tiled", runs_dir=root / "runs", device="cpu", force=False, quiet=True)
    return SimpleNamespace(root=root, data=root / "data", run=root / "runs" / "tiled")


@pytest.fixture(scope="module", params=["onnx", "torchscript"])
def exported(request, tiled, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / ("m.onnx" if request.param == "onnx" else "m.pt")
    return kc.export(tiled.run, out=out, format=request.param, tta_flips=FLIPS, data=tiled.data)


def _test_images(tiled) -> np.ndarray:
    paths = sorted((tiled.data / "test" / "image").glob("*.png"))
    return np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths])  # [2, 96, 96]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_the_export_of_a_tiled_run_is_per_tile_and_records_the_tiles(exported):
    info = json.loads(exported.sidecar.read_text())
    assert info["tile"] == TILE and info["size"] == [96, 96]
    assert info["input"]["shape"] == ["N", 1, 48, 48] and info["output"]["shape"] == ["N", 4, 48, 48]
    assert info["max_abs_error"] == exported.max_error <= TOLERANCE
    assert info["checked_on"].startswith("8 labelled (OOF) images of ")
    assert info["checked_on"].endswith("(96x96, by tiles of 48x48)")
    model = kc.load_export(exported.path)
    assert model.tile == TileConfig(**TILE)
    one = model.predict_proba(np.zeros((3, 1, 48, 48), np.uint8))  # one tile: the module itself, dynamic batch
    assert one.shape == (3, 4, 48, 48)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_load_export_tiles_like_ensemble(exported, tiled, one_torch_thread):
    """The exported file's probabilities of images larger than the tile (the trained 96 px and a 150x200 one,
    neither a multiple of the step) equal the ensemble's tiled ones within the export tolerance, and differ
    from a whole-image prediction (so the tiling is real)."""
    model = kc.load_export(exported.path)
    pred = kc.load_ensemble(tiled.run, tta_flips=FLIPS, device="cpu")
    grey = _test_images(tiled)
    big = cv2.resize(grey[0], (200, 150), interpolation=cv2.INTER_LINEAR)
    for imgs in (grey, big[None]):
        ref = predict_images(pred.runs, imgs[..., None], pred.device, pred.passes, pred.weights, 4)  # ensemble's
        probs = model.predict_proba(imgs[:, None])
        assert probs.shape == ref.shape == (len(imgs), 4, *imgs.shape[1:])
        err = float(np.abs(probs - ref).max())
        print(f"{exported.info['format']}: {imgs.shape[1]}x{imgs.shape[2]} tiled, max |export - ensemble| {err:.2e}")
        assert err <= TOLERANCE
        whole = predict_proba(list(pred.runs[0].models.values()), imgs[..., None], pred.device, tta=FLIPS)
        assert np.abs(whole - ref).max() > 10 * TOLERANCE
    # through the Predictor interface (resize to the trained size, tiles, resize back): the same as the run's
    via_file = kc.load_ensemble(exported.path).predict_proba(big[None])
    np.testing.assert_allclose(via_file, pred.predict_proba(big[None]), atol=TOLERANCE)


def test_runs_that_tile_differently_cannot_share_a_file():
    def run(tile, name):
        cfg = Config.model_validate({"data": {"size": 96}, "infer": {"tile": tile}})
        return SimpleNamespace(cfg=cfg, path=name)

    pred = SimpleNamespace(size=(96, 96), runs=[run({"size": 48}, "a"), run(None, "b")])
    with pytest.raises(KaggleCMRError, match="b: predicts by whole images, a by tiles 48x48 .* separately"):
        export_tile(pred)
    pred.runs[1] = run({"size": 48, "batch": 2}, "b")  # the batch does not change the result
    assert export_tile(pred).size == 48
    pred.runs = [run({"size": 128}, "a")]  # larger than the trained size: whole images
    assert export_tile(pred) is None


def test_a_broken_tile_entry_in_the_sidecar_is_one_error(tmp_path):
    f = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(f))
    (tmp_path / "m.pt.json").write_text(json.dumps({"tile": {"size": 2}}))
    with pytest.raises(KaggleCMRError, match="m.pt.json: 'tile' is not a tile setting"):
        kc.load_export(f)
