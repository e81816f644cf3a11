"""Training progress: a rich bar on a terminal, one plain line per epoch otherwise; ``metrics.csv``."""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

from kagglecmr.utils.io import atomic_write_text


class Reporter:
    """A rich progress bar on a terminal; one plain line per epoch otherwise (or with --quiet)."""

    def __init__(self, title: str, epochs: int, quiet: bool):
        self.title, self.epochs = title, epochs
        self.live = not quiet and sys.stdout.isatty()
        self.progress = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self.progress.start()
            self.task = self.progress.add_task(title, total=epochs, info="")

    def step(self, epoch: int, loss: float) -> None:
        if self.progress:
            self.progress.update(self.task, info=f"epoch {epoch + 1} loss {loss:.4f}")

    def epoch(self, row: dict) -> None:
        dice = " ".join(f"{k[5:]}:{v:.3f}" for k, v in row.items() if k.startswith("dice_"))
        info = f"loss {row['train_loss']:.4f}"
        if not math.isnan(row["val_dice"]):
            score = row.get("val_score", row["val_dice"])  # the dataset's metric; Dice per class in brackets
            other = "" if score == row["val_dice"] else f" (Dice {row['val_dice']:.4f})"
            info += f" val {score:.4f}{other} [{dice}]" + (" *" if row["best"] else "")
        if self.progress:
            self.progress.update(self.task, completed=row["epoch"], info=info)
        else:
            print(f"{self.title} epoch {row['epoch']}/{self.epochs} {info} ({row['time_s']:.1f}s)", flush=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()


def write_metrics(path: Path, history: list[dict]) -> None:
    if not history:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0].keys()), lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())
