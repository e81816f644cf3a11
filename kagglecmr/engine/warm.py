"""One warm-up per process: the next fold reuses the model, optimiser and captured training step.

A process that trains several folds one after another (``train --fold 0..4``, a ``--jobs`` child with
several folds, a Ray worker, ``--seeds``) used to build everything again for every fold: the model on
the device, optimiser, EMA/SWA copies, ``torch.compile`` and the CUDA-graph capture of the training
step (seconds on a GPU, for every fold).  :func:`step_state` keeps the last :class:`StepState` of the
process under a key of everything that fixes its code and tensor shapes (model, data, loss, optimiser,
batch layout, device, precision).  A fold with the same key gets it back *re-initialised in place*:

- the fold's freshly seeded model (built on the CPU exactly as before, so the same random decoder
  initialisation) is copied into the same parameter and buffer tensors;
- optimiser moments and step counts are cleared (eager) or zeroed in place (captured step), the
  learning rates put back to their base values, the scheduler's ``initial_lr`` dropped;
- EMA and SWA copies start again from the fresh weights, and a fresh loss scaler is made.

So the captured graph (which refers to those tensors' memory) stays valid, ``torch.compile`` does not
recompile, and what is trained is what a fresh build would train: on the CPU the metrics and weights
are identical with and without reuse (tests).  ``KAGGLECMR_WARM=0`` turns reuse off (a fresh build
for every fold, as before).  A fold that resumes from ``last.pt`` gets new optimiser state tensors
from the checkpoint, so its step is captured again (:meth:`StepState.load_optimizer`).

The state lives as long as a run: :func:`kagglecmr.engine.orchestrate.run_train` calls :func:`clear` when
it returns or raises, so after ``kc.train(...)`` in a notebook its memory is free again.
"""

from __future__ import annotations

import gc
import json
import os

import torch

from kagglecmr.cfg.config import Config
from kagglecmr.engine.averaging import EMA
from kagglecmr.engine.cudagraph import GraphedStep
from kagglecmr.engine.optim import build_optimizer
from kagglecmr.models.cls_head import part, with_presence
from kagglecmr.models.losses import build_loss
from kagglecmr.models.losses_multilabel import build_multilabel_loss
from kagglecmr.utils.runtime import autocast

WARM_ENV = "KAGGLECMR_WARM"  # "0": no reuse between folds
_CACHE: dict[str, StepState] = {}


def warm_enabled() -> bool:
    return os.environ.get(WARM_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def clear() -> None:
    """Forget the kept step state and free its memory, the GPU's included (its captured step refers to
    it in a reference cycle, hence the collection).  Called when a run ends (``run_train``) and before a
    state with another key is built."""
    if not _CACHE:
        return
    _CACHE.clear()
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def state_key(cfg: Config, device: torch.device, dtype, graphs: bool, bs_lab: int, n_pseudo: int) -> str:
    """What the kept state depends on: seeds, epochs, schedule, augmentation and inference settings do not
    change the tensors or the captured code, so folds, seeds and epoch counts share one state."""
    t = cfg.train
    train = {k: getattr(t, k) for k in ("optimizer", "lr", "weight_decay", "grad_clip", "ema", "amp",
                                        "channels_last", "compile", "cuda_graphs")}
    train |= {"swa": t.swa_epochs > 0, "pseudo_weight": t.pseudo.weight if n_pseudo else None}
    key = {"model": cfg.model.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
           "loss": cfg.loss.model_dump(mode="json"), "train": train, "device": str(device), "dtype": str(dtype),
           "graphs": graphs, "batch": [bs_lab, n_pseudo]}
    return json.dumps(key, sort_keys=True, default=str)


class StepState:
    """The model on its device and everything one training step changes or runs: optimiser, loss,
    EMA/SWA copies, loss scaler, the (compiled) forward and the CUDA graph of the step once captured."""

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, dtype, graphs: bool,
                 bs_lab: int, n_pseudo: int):
        self.device, self.dtype, self.graphs = device, dtype, graphs
        self.bs_lab, self.n_pseudo = bs_lab, n_pseudo
        self.grad_clip, self.pseudo_w = cfg.train.grad_clip, float(cfg.train.pseudo.weight)
        self.model = model.to(device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg, self.model, capturable=graphs)
        self.base_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        loss = build_multilabel_loss if cfg.data.multilabel else build_loss  # packed targets, sigmoid per class
        self.criterion = with_presence(loss(cfg.loss, cfg.data.num_classes), cfg).to(device)
        self.ema = EMA(self.model, cfg.train.ema) if cfg.train.ema > 0 else None
        self.swa = torch.optim.swa_utils.AveragedModel(self.model) if cfg.train.swa_epochs > 0 else None
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        self.scaler = self._new_scaler()
        self.graphed: GraphedStep | None = None
        self.folds = 1  # folds this state has trained (including the current one)

    def _new_scaler(self):
        return torch.amp.GradScaler(self.device.type,
                                    enabled=(self.dtype == torch.float16 and self.device.type == "cuda"))

    @torch.no_grad()
    def reset(self, fresh: torch.nn.Module) -> None:
        """Start the next fold from ``fresh`` (a newly built, seeded model), in the same tensors."""
        self.model.load_state_dict(fresh.state_dict())  # copies into the existing tensors
        if self.graphed is None:
            self.optimizer.state.clear()  # exactly a fresh optimiser
        else:
            for st in self.optimizer.state.values():  # the captured step refers to these tensors
                for v in st.values():
                    if torch.is_tensor(v):
                        v.zero_()
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            group.pop("initial_lr", None)  # so the new scheduler starts from the base rate
        if self.ema is not None:
            self.ema.model.load_state_dict(self.model.state_dict())
        if self.swa is not None:
            self.swa.module.load_state_dict(self.model.state_dict())
            self.swa.n_averaged.zero_()
        self.scaler = self._new_scaler()
        self.folds += 1

    def load_optimizer(self, state: dict) -> None:
        """Resume: the checkpoint's optimiser state replaces the tensors a captured step used."""
        self.optimizer.load_state_dict(state)
        self.graphed = None

    # ---- the step
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a batch (gradients must be cleared before); returns the loss."""
        with autocast(self.device, self.dtype):
            logits = self.forward(x)
        if self.n_pseudo:
            b = self.bs_lab
            loss = self.criterion(part(logits, slice(None, b)), y[:b]) + \
                self.pseudo_w * self.criterion(part(logits, slice(b, None)), y[b:])
        else:
            loss = self.criterion(logits, y)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()

    def state_tensors(self) -> list[torch.Tensor]:
        """Everything a training step changes, in a stable order (for CUDA-graph warm-up undo)."""
        out = list(self.model.state_dict(keep_vars=True).values())
        out += list(self.ema.model.state_dict(keep_vars=True).values()) if self.ema is not None else []
        out += list(self.swa.state_dict(keep_vars=True).values()) if self.swa is not None else []
        out += [v for p in self.model.parameters() for v in self.optimizer.state.get(p, {}).values()
                if torch.is_tensor(v)]
        return out

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A training step: replayed from the CUDA graph (captured on first use), else eager."""
        if self.graphs and self.graphed is None:
            self.graphed = GraphedStep.capture(self.train_step, self.state_tensors, x, y, self.optimizer)
            self.graphs = self.graphed is not None
        if self.graphed is not None:
            return self.graphed(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        return self.train_step(x, y)


def step_state(cfg: Config, fresh: torch.nn.Module, device: torch.device, dtype, graphs: bool,
               bs_lab: int, n_pseudo: int) -> tuple[StepState, bool]:
    """The process's kept state re-initialised from ``fresh`` when its key matches (``(state, True)``),
    else a new one built around ``fresh`` (``(state, False)``), kept for the next fold."""
    key = state_key(cfg, device, dtype, graphs, bs_lab, n_pseudo)
    if warm_enabled() and key in _CACHE:
        st = _CACHE[key]
        st.reset(fresh)
        return st, True
    clear()  # one kept state per process: its device memory is freed before a new one is built
    st = StepState(cfg, fresh, device, dtype, graphs, bs_lab, n_pseudo)
    if warm_enabled():
        _CACHE[key] = st
    return st, False
