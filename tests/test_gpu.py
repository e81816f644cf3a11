"""GPU-only checks (skipped without CUDA): the CUDA-graph training step, GPU augmentation and a short
training run on the GPU fast path.  CI has no GPU; these run on a lent GPU machine."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kagglecmr.cfg.config import load_config
from kagglecmr.data import augment as aug
from kagglecmr.data.dataset import prepare
from kagglecmr.data.demo import make_demo_dataset
from kagglecmr.engine.cudagraph import GraphedStep
from kagglecmr.engine.trainer import train_fold

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1)).to(CUDA)


def test_graphed_step_matches_eager_and_warmup_is_undone():
    model = _toy()
    reference = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2, device=CUDA), capturable=True)
    # the same capturable optimiser run eagerly: graph replay must reproduce it, not merely approximate it
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=torch.tensor(1e-2, device=CUDA), capturable=True)
    g = torch.Generator(device=CUDA).manual_seed(1)
    batches = [(torch.rand(4, 1, 16, 16, device=CUDA, generator=g),
                torch.randint(0, 3, (4, 16, 16), device=CUDA, generator=g)) for _ in range(4)]

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    def state():
        return list(model.state_dict(keep_vars=True).values()) + [
            v for p in model.parameters() for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    graphed = GraphedStep.capture(step, state, *batches[0], opt)
    assert graphed is not None
    for k, v in model.state_dict().items():  # the warm-up steps left no trace
        assert torch.equal(v, before[k]), k
    for x, y in batches:
        loss = graphed(x, y).item()
        ref_opt.zero_grad(set_to_none=True)
        ref_loss = F.cross_entropy(reference(x), y)
        ref_loss.backward()
        ref_opt.step()
        assert loss == pytest.approx(ref_loss.item(), rel=1e-4, abs=1e-5)
    for (k, v), rv in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(v.float(), rv.float(), atol=1e-4, rtol=1e-4), k


def test_gpu_warp_equals_cpu_warp():
    x = torch.rand(6, 1, 32, 32)
    y = torch.randint(0, 4, (6, 32, 32))
    m = aug.batch_affine_matrices(torch.linspace(-30, 30, 6), torch.linspace(0.8, 1.2, 6),
                                  torch.linspace(-3, 3, 6), torch.linspace(2, -2, 6), 32, 32)
    grid = F.affine_grid(aug.theta_from_pixel_matrices(m, 32, 32), (6, 1, 32, 32), align_corners=False)
    xc, yc = aug.warp(x, y, grid)
    xg, yg = aug.warp(x.to(CUDA), y.to(CUDA), grid.to(CUDA))
    assert torch.allclose(xc, xg.cpu(), atol=1e-5)
    assert (yc == yg.cpu()).float().mean() > 0.999


@pytest.mark.parametrize("graphs", [True, False])
def test_short_gpu_run_learns(tmp_path, graphs):
    root = tmp_path / "data"
    make_demo_dataset(root, n_train=40, n_val=10, n_test=0, seed=0)
    cfg = load_config("demo", ["train.epochs=6", f"train.cuda_graphs={str(graphs).lower()}", "train.amp=bf16"])
    cfg, _, data = prepare(cfg, root, quiet=True)
    folds = pd.DataFrame({"id": data.ids, "fold": np.arange(len(data)) % 5})
    res = train_fold(cfg, data, folds, 0, tmp_path / "run" / "fold0", device=CUDA, quiet=True)
    m = pd.read_csv(tmp_path / "run" / "fold0" / "metrics.csv")
    assert np.isfinite(m["train_loss"]).all()
    assert m["train_loss"].iloc[-1] < m["train_loss"].iloc[0]
    assert res.best_score > 0.1
