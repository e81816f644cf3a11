"""Optimiser (no weight decay on norms and biases) and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from kagglecmr.cfg.config import Config


def lr_lambda(cfg: Config, steps_per_epoch: int):
    total = cfg.train.epochs * steps_per_epoch
    warm = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    floor = cfg.train.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.train.scheduler == "constant":
            return 1.0
        t = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def build_optimizer(cfg: Config, model: torch.nn.Module, *, capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD without weight decay on norms and biases.  ``capturable``: Adam state and the
    learning rate live on the GPU as tensors, so the step can be replayed from a CUDA graph."""
    t = cfg.train
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, nesterov=True)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    if capturable:
        device = next(model.parameters()).device
        return cls(groups, lr=torch.tensor(t.lr, device=device), capturable=True)
    return cls(groups, lr=t.lr)
