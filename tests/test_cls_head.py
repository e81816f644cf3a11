"""The image-level head (model.cls_head): the model's outputs, the presence loss, and a tiny end-to-end run on the
sparse demo (about half the slices empty): train, OOF head probabilities, ensemble --gate head, predict with the
run's plan, export."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from kagglecmr.cfg.config import Config
from kagglecmr.models.cls_head import PresenceLoss, presence_targets
from kagglecmr.models.factory import build_model
from kagglecmr.models.losses import build_loss
from kagglecmr.utils.errors import ConfigError

TINY = {"seed": 3, "data": {"size": 64, "in_channels": 1, "num_classes": 4},
        "model": {"arch": "Unet", "encoder": "resnet18", "weights": "none", "cls_head": True,
                  "params": {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}},
        "augment": {"affine": 0.0, "intensity": 0.0, "gamma": 0.0},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "warmup_epochs": 0, "amp": "none", "val_batch_size": 16,
                  "threads": 1},
        "infer": {"tta": ["none", "hflip"]}}


def tiny_cfg(**model) -> Config:
    d = json.loads(json.dumps(TINY))
    d["model"] |= model
    return Config.model_validate(d)


def test_model_returns_presence_in_training_and_the_segmentation_alone_in_eval(one_torch_thread):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    x = torch.rand(2, 1, 64, 64)
    model.train()
    seg, presence = model(x)
    assert seg.shape == (2, 4, 64, 64) and presence.shape == (2, 3)
    model.eval()
    with torch.no_grad():
        y = model(x)
        assert isinstance(y, torch.Tensor) and y.shape == (2, 4, 64, 64)
        _, labels = model.net(model._prepare(x)[0])
        torch.testing.assert_close(model.presence_logits(x), labels)  # the encoder and the head alone
    assert model.has_presence and not build_model(tiny_cfg(cls_head=False)).has_presence
    with pytest.raises(ConfigError, match="aux_params"):
        build_model(tiny_cfg(params={"aux_params": {"classes": 3}}))


def test_presence_loss_is_the_segmentation_loss_plus_weighted_bce():
    target = torch.zeros(3, 8, 8, dtype=torch.long)
    target[0, 1, 1] = 2
    target[1, :2, :2] = 3
    target[1, 5, 5] = 1
    target[2, 0, 0] = 255  # ignored pixels are no class
    assert presence_targets(target, 4).tolist() == [[0, 1, 0], [1, 0, 1], [0, 0, 0]]
    seg_loss = build_loss(tiny_cfg().loss, 4)
    loss = PresenceLoss(seg_loss, 4, 0.5)
    torch.manual_seed(0)
    seg, presence = torch.randn(3, 4, 8, 8), torch.randn(3, 3)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(presence, presence_targets(target, 4))
    torch.testing.assert_close(loss((seg, presence), target), seg_loss(seg, target) + 0.5 * bce)
    torch.testing.assert_close(loss(seg, target), seg_loss(seg, target))  # eval output: no head term


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    """Sparse demo data, 3 folds, a 2-epoch run with a cls head."""
    from kagglecmr.data.demo import make_demo_dataset
    from kagglecmr.data.folds import run_make_folds
    from kagglecmr.engine.orchestrate import run_train

    root = tmp_path_factory.mktemp("sparse")
    data = root / "data"
    summary = make_demo_dataset(data, n_train=24, n_val=0, n_test=4, seed=1, size=64, kind="sparse")
    assert 6 <= summary["empty"] <= 18
    run_make_folds(data, n_folds=3, seed=0, out=root / "folds.csv", allow_unbalanced=True)
    run_train(tiny_cfg(), fold_spec="0..2", data_root=data, folds_path=root / "folds.csv", name="head",
              runs_dir=root / "runs", device="cpu", force=False, quiet=True)
    return root, data, root / "runs" / "head"


def test_sparse_run_with_a_head_gates_on_oof_and_predict_applies_the_same_plan(sparse_run, tmp_path, one_torch_thread):
    import kagglecmr.api as kc
    from kagglecmr.engine.ensembler import run_ensemble
    from kagglecmr.engine.postprocess import apply_plan
    from kagglecmr.formats.competition_metric import Metric

    root, data, run = sparse_run
    with np.load(run / "fold0" / "oof.npz") as z:  # the head's OOF probabilities beside the softmax
        assert z["presence"].shape == (len(z["ids"]), 3) and 0 <= z["presence"].min() <= z["presence"].max() <= 1
    res = run_ensemble(runs=[run], runs_dir=root / "runs", data_root=data, split=["oof", "test"], tta=False,
                       tta_flips=None, out=None, save_masks=None, postprocess="auto", weights=None, device="cpu",
                       gate="head")
    saved = json.loads((run / "postprocess.json").read_text())
    oof = res["oof"]
    no_gate = {k: {kk: vv for kk, vv in r.items() if kk != "gate"} for k, r in saved.items()}
    plain = apply_plan(oof["probs"].argmax(1).astype(np.uint8), no_gate, 4)
    m = Metric()
    with_head = m.table_labels(np.stack(oof["labels"]), oof["truth"], 4).score
    without = m.table_labels(plain, oof["truth"], 4).score
    assert with_head >= without  # a class keeps no gate unless the head's threshold raises its OOF
    record = json.loads((run / "ensemble_oof.json").read_text())["entries"]["none"]["postprocess"]
    assert record["score"] == pytest.approx(with_head) and record["plan"] == saved
    # predict/load_ensemble with the run's plan = the ensemble's test masks (gates decided the same way)
    test = res["test"]
    pred = kc.load_ensemble(run, device="cpu", postprocess="auto")
    images = [cv2.imread(str(data / "test" / "image" / f"{i}.png"), cv2.IMREAD_GRAYSCALE) for i in test["ids"]]
    np.testing.assert_array_equal(np.stack(pred.predict(images)), np.stack(test["labels"]))
    plain_pred = kc.load_ensemble(run, device="cpu").predict(images)  # default: the plain argmax, as before
    np.testing.assert_array_equal(plain_pred, np.stack(pred.predict_proba(images)).argmax(1))


def test_a_run_with_a_head_exports_the_segmentation(sparse_run, tmp_path, one_torch_thread):
    import kagglecmr.api as kc

    root, data, run = sparse_run
    one = tmp_path / "one"  # fold 0 alone: one model is enough, and three times quicker to trace
    shutil.copytree(run / "fold0", one / "fold0", ignore=shutil.ignore_patterns("last.pt"))
    res = kc.export(one, out=tmp_path / "m.pt", format="torchscript")  # checked on random images
    assert res.max_error < 1e-3
    exported = kc.load_export(tmp_path / "m.pt")
    x = np.zeros((2, 1, 64, 64), np.uint8)
    assert exported.predict_proba(x).shape == (2, 4, 64, 64)  # probabilities only; the head is not exported
