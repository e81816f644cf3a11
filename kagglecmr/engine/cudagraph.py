"""The training step replayed from a CUDA graph (GPU only; training falls back to eager when capture fails)."""

from __future__ import annotations

import torch

from kagglecmr.cfg.config import Config


def use_cuda_graphs(cfg: Config, device: torch.device, dtype) -> bool:
    """Graph the training step on GPUs unless something in it needs the host (fp16 loss scaling,
    torch.compile, SGD's float learning rate)."""
    t = cfg.train
    return (t.cuda_graphs and device.type == "cuda" and dtype != torch.float16 and not t.compile
            and t.optimizer in ("adam", "adamw"))


class GraphedStep:
    """The whole training step (forward, loss, backward, clipping, optimiser, EMA) captured once in a
    CUDA graph and replayed for every batch: one launch instead of hundreds, which is what a small
    model on a big GPU is bound by.

    Capture needs a few warm-up steps; every weight, buffer and optimiser/EMA state they touch is put
    back afterwards, so graphing does not change what is trained.  If the step cannot be captured
    (an op that synchronises with the host), :meth:`capture` returns ``None`` and training runs eagerly.
    """

    def __init__(self, step, state_tensors, x: torch.Tensor, y: torch.Tensor, optimizer):
        self.step, self.state_tensors, self.optimizer = step, state_tensors, optimizer
        self.x, self.y = x.clone(), y.clone()
        self.lrs = [g["lr"] for g in optimizer.param_groups]

    @classmethod
    def capture(cls, step, state_tensors, x, y, optimizer, warmup: int = 3) -> GraphedStep | None:
        g = cls(step, state_tensors, x, y, optimizer)
        before = [t.detach().clone() for t in state_tensors()]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    optimizer.zero_grad(set_to_none=True)
                    step(g.x, g.y)
            torch.cuda.current_stream().wait_stream(side)
            g.graph = torch.cuda.CUDAGraph()
            optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(g.graph):
                g.loss = step(g.x, g.y)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
            print(f"note: training step not captured in a CUDA graph ({type(exc).__name__}); running eagerly",
                  flush=True)
            g = None
        with torch.no_grad():
            for k, t in enumerate(state_tensors()):
                if k < len(before):
                    t.copy_(before[k])
                else:  # created by the warm-up: fresh Adam moments and step counts start at 0
                    t.zero_()
        optimizer.zero_grad(set_to_none=g is None)
        return g

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for t, group in zip(self.lrs, self.optimizer.param_groups):  # the scheduler may set a float
            if group["lr"] is not t:
                t.fill_(float(group["lr"]))
                group["lr"] = t
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.loss
