"""``data.context: partner``: the near-duplicate frame of the same slice as extra input channels."""

from __future__ import annotations

import numpy as np
import torch

from kagglecmr.cfg.config import load_config
from kagglecmr.data.context import add_context, partners
from kagglecmr.data.dataset import load_dataset
from kagglecmr.data.folds import similarity_groups
from kagglecmr.models.factory import build_model


def test_partners_are_similarity_group_mates_or_the_image_itself(project, labelled):
    rng = np.random.default_rng(0)
    frames = labelled.images[:5].astype(np.int16) + rng.integers(-6, 7, labelled.images[:5].shape)
    images = np.concatenate([labelled.images[:10], frames.clip(0, 255).astype(np.uint8)])  # 5 pairs, 5 alone
    p = partners(images)
    assert p.tolist() == [10, 11, 12, 13, 14, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    groups = similarity_groups(images)
    assert (groups[p] == groups).all()  # a partner is always in the image's group (so in its fold)
    test = load_dataset(project.data).load("test", labelled=False)
    assert len(partners(test.images)) == len(test)  # found the same way on the test split


def test_add_context_stacks_the_partner_channels(labelled):
    x = add_context(labelled.images, "partner")
    assert x.shape == (*labelled.images.shape[:3], 2) and x.dtype == np.uint8
    assert np.array_equal(x[..., :1], labelled.images)
    assert np.array_equal(x[..., 1:], labelled.images[partners(labelled.images)])
    assert add_context(labelled.images, "none") is labelled.images


def test_partner_run_trains_and_ensembles(project, tmp_path, main_cli, one_torch_thread):
    cfg = load_config(project.config, ["data.context=partner"])
    assert cfg.data.model_channels == 2
    model = build_model(cfg, weights="none")
    assert model(torch.rand(1, 2, 96, 96)).shape == (1, 4, 96, 96)
    proc = main_cli("train", "--fold", "0..4", "--config", project.config, "--data", project.data, "--folds",
                    project.folds, "--runs-dir", tmp_path, "--name", "ctx", "--epochs", "1", "--set",
                    "data.context=partner", "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "s.csv"
    proc = main_cli("ensemble", "--runs", tmp_path / "ctx", "--runs", project.run, "--data", project.data,
                    "--out", out, "--device", "cpu")  # OOF (postprocessing auto), then the test split
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "OOF Dice" in proc.stdout
