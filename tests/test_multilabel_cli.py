"""``task: multilabel`` end to end through the command line on the generated overlapping-shapes demo:
demo-data --kind multilabel -> make-folds -> train (2 folds, 2 epochs of a tiny Unet) -> ensemble --split
oof,test with per-class masks -> score (agrees with the printed OOF) -> encode (round trip) -> predict (one file
per class).  That a model learns overlaps is tested in ``test_multilabel.py`` (a per-pixel model, no trainer)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import yaml

from kagglecmr.data.dataset import load_dataset

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

SMALL = """\
seed: 3
model:
  arch: Unet
  encoder: resnet18
  weights: none
  params: {encoder_depth: 3, decoder_channels: [16, 8, 4]}
loss: {name: dice_ce}
augment: {hflip: 0.5, vflip: 0.5, affine: 0, intensity: 0, gamma: 0}
train: {epochs: 2, batch_size: 4, lr: 0.01, warmup_epochs: 0, amp: none, val_batch_size: 16}
infer: {tta: [none, hflip]}
"""


def test_overlapping_classes_end_to_end(tmp_path, main_cli):
    data = tmp_path / "shapes"
    made = main_cli("demo-data", data, "--kind", "multilabel", "--n-train", "12", "--n-val", "0", "--n-test", "3",
                    "--size", "32")
    assert made.returncode == 0, made.stderr
    assert (data / "dataset.yaml").is_file() and "left out as empty" in made.stdout
    (tmp_path / "small.yaml").write_text(SMALL)

    folds = main_cli("make-folds", "--data", data, "--n-folds", "2", "--no-groups", "--out", tmp_path / "folds.csv")
    assert folds.returncode == 0, folds.stderr
    assert all(name in folds.stdout for name in ("square", "circle", "bar"))  # per-class presence per fold

    train = main_cli("train", "--fold", "0..1", "--config", tmp_path / "small.yaml", "--data", data, "--folds",
                     tmp_path / "folds.csv", "--runs-dir", tmp_path / "runs", "--device", "cpu", "--quiet")
    assert train.returncode == 0, train.stderr
    run = tmp_path / "runs" / "small"
    cfg = yaml.safe_load((run / "fold0" / "config.yaml").read_text())
    assert cfg["data"]["task"] == "multilabel" and cfg["data"]["num_classes"] == 3  # 3 sigmoids, no background
    oof = json.loads((run / "oof.json").read_text())
    assert set(oof["per_class"]) == {"1", "2", "3"}

    ens = main_cli("ensemble", "--runs", run, "--data", data, "--split", "oof,test", "--tta", "--save-masks",
                   tmp_path / "masks", "--device", "cpu", cwd=tmp_path)  # CSVs in tmp_path/submissions
    assert ens.returncode == 0, ens.stderr
    chosen = next(x for x in ens.stdout.splitlines() if x.startswith("postprocessing chosen on OOF"))
    plan = json.loads((run / "postprocess.json").read_text())
    assert set(plan["thresholds"]) == {"1", "2", "3"}  # saved as the run's plan
    printed = float(chosen.split("-> OOF dice ")[1].split()[0])
    ds = load_dataset(data)
    truth = ds.labelled()
    pred = ds.read_mask_folder(tmp_path / "masks" / "oof")  # DIR/<class>/<id>.png, in the dataset's values
    assert sorted(p.name for p in (tmp_path / "masks" / "oof").iterdir()) == ["bar", "circle", "square"]
    assert list(pred) == truth.ids and all(m.shape == (32, 32) for m in pred.values())

    # the OOF CSV scores as printed; the saved masks encode back to the same CSV
    sub = next((tmp_path / "submissions").glob("small-oof-*.csv"))
    scored = main_cli("score", sub, "--data", data, "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["score"] == pytest.approx(printed, abs=1e-4)
    header, first = sub.read_text().splitlines()[:2]
    assert header == "Image_Label,EncodedPixels" and first.startswith("img1_square,")
    again = main_cli("encode", tmp_path / "masks" / "oof", "--data", data, "--out", tmp_path / "again.csv")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.csv").read_text() == sub.read_text()

    # predict: one PNG per image and class with the run's thresholds
    images = data / "test" / "images"
    pr = main_cli("predict", images, "--runs", run, "--out", tmp_path / "pred", "--tta", "--device", "cpu")
    assert pr.returncode == 0, pr.stderr
    for name in ("square", "circle", "bar"):
        for f in images.iterdir():
            saved = cv2.imread(str(tmp_path / "pred" / name / f.name), cv2.IMREAD_UNCHANGED)
            assert saved.shape == (32, 32) and set(np.unique(saved)) <= {0, 255}
            ens_mask = cv2.imread(str(tmp_path / "masks" / "test" / name / f.name), cv2.IMREAD_UNCHANGED)
            assert (saved == ens_mask).mean() > 0.99  # the same models, TTA and plan as ensemble's

    # export: sigmoid probabilities and the plan in FILE.json; loaded back it predicts what predict wrote
    ex = main_cli("export", "--runs", run, "--out", tmp_path / "m.pt", "--format", "torchscript", "--tta", "--data",
                  data)
    assert ex.returncode == 0, ex.stderr
    info = json.loads((tmp_path / "m.pt.json").read_text())
    assert info["task"] == "multilabel" and info["plan"] == plan and "sigmoid" in info["output"]["note"]
    from kagglecmr.api import load_ensemble
    from kagglecmr.formats.multilabel import class_mask

    exported = load_ensemble(tmp_path / "m.pt")
    files = sorted(images.iterdir())
    pics = [cv2.imread(str(f))[:, :, ::-1] for f in files]
    assert exported.predict_proba(pics).sum(1).max() > 1.05 or exported.predict_proba(pics).sum(1).min() < 0.95
    for f, m in zip(files, exported.predict(pics)):
        for c, name in enumerate(("square", "circle", "bar"), start=1):
            saved = cv2.imread(str(tmp_path / "pred" / name / f.name), cv2.IMREAD_UNCHANGED)
            assert (class_mask(m, c) == (saved == 255)).mean() > 0.99
