"""Experiment tracking beyond ``metrics.csv``: the sinks named by the config key ``train.log``.

``metrics.csv`` (one row per epoch) is always written: it is the run's record that resume, reports
and ``kagglecmr runs`` read.  ``tensorboard`` adds event files in ``<fold dir>/tb/`` through torch's
own :class:`torch.utils.tensorboard.SummaryWriter`; view them with ``tensorboard --logdir runs``.

Scalars, step = epoch: ``loss/train``, ``loss/val``, ``dice/val``, ``dice/class_<k>``, ``lr``,
``time/epoch_s``.  On resume the writer purges events after the resumed epoch, so a crash and
restart leaves one clean curve.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from kagglecmr.utils.errors import ConfigError

TB_DIR = "tb"


def _scalars(row: dict) -> dict[str, float]:
    """Tag -> value of one ``metrics.csv`` row (non-finite values left out)."""
    tags = {"loss/train": row.get("train_loss"), "loss/val": row.get("val_loss"), "dice/val": row.get("val_dice"),
            "lr": row.get("lr"), "time/epoch_s": row.get("time_s")}
    tags |= {f"dice/class_{k[5:]}": v for k, v in row.items() if k.startswith("dice_") and k[5:].isdigit()}
    out = {}
    for tag, v in tags.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[tag] = float(v)
    return out


class Tracker:
    """Per-epoch logging to the sinks of ``train.log`` other than csv (today: tensorboard).

    ``Tracker(out_dir, cfg.train.log, start_epoch)`` before the epoch loop, :meth:`epoch` with each
    epoch's metrics row, :meth:`close` at the end (also after an exception).
    """

    def __init__(self, out_dir: str | os.PathLike, sinks, start_epoch: int = 0):
        self.writer = None
        if "tensorboard" in sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.log: tensorboard is not installed (pip install tensorboard)") from None
            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / TB_DIR), purge_step=start_epoch + 1)

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        step = int(row["epoch"])
        for tag, value in _scalars(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
