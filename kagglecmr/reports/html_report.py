"""``kagglecmr report RUN``: one self-contained ``report.html`` in the run folder.

The page holds everything a run left on disk, with the plots embedded as base64 PNGs (the file
alone is the report): config summary, dataset description (``dataset.json`` of a fold, when
present), model size, timings and peak memory, per-fold and per-class out-of-fold scores (the
dataset's metric, which ``dataset.json`` records; Dice for older runs), the learning curves of all
folds, the worst out-of-fold images as truth | prediction overlays (images from ``--data``), and
the postprocessing plan.  Missing or unfinished folds are named, not fatal.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np

from kagglecmr.cfg.config import Config
from kagglecmr.data.dataset import described_metric, prepare
from kagglecmr.engine.postprocess import describe_plan, load_plan
from kagglecmr.engine.rundir import ENSEMBLE_OOF, read_json
from kagglecmr.formats.competition_metric import Metric, MetricTable
from kagglecmr.reports.leaderboard import flatten, fold_dirs, read_run, run_config
from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.io import atomic_write_text
from kagglecmr.utils.plots import contact_sheet, plot_class_dice, plot_run_curves

REPORT = "report.html"
CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1560px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.note{color:#a05a00}img{max-width:100%;border:1px solid #ddd}
code{background:#f6f6f6;padding:0 3px}h2{border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:28px}"""


def _e(x) -> str:
    return html.escape(str(x))


def _num(v, fmt: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    """An HTML table; the first ``left`` columns left-aligned."""
    def cells(row, tag):
        return "".join(f"<{tag}{' class=l' if j < left else ''}>{_e(c)}</{tag}>" for j, c in enumerate(row))

    return "<table><tr>" + cells(header, "th") + "</tr>" + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows) + "</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _metrics(path: Path):
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (OSError, ValueError):
        return None


def _oof_files(run_dir: Path, metric: Metric) -> dict[int, dict]:
    """``{fold: {"ids", "labels", "per_class", "per_image"}}`` of the readable ``oof.npz`` files: scores under
    ``metric`` from the saved counts, or the Dice rows of files written before them."""
    out = {}
    for k, d in sorted(fold_dirs(run_dir).items()):
        try:
            with np.load(d / "oof.npz") as z:
                if "counts" in z.files:
                    c = z["counts"]
                    t = MetricTable(metric, c[..., 0], c[..., 1], c[..., 2], tuple(int(x) for x in z["classes"]),
                                    z["scores"] if metric.needs_masks else None)
                    per_class, per_image = dict(zip(t.classes, t.per_class)), t.per_image
                else:
                    per_class = {c + 1: v for c, v in enumerate(z["dice"].mean(0))}
                    per_image = z["dice"].mean(1)
                out[k] = {"ids": [str(i) for i in z["ids"]], "labels": z["labels"], "per_class": per_class,
                          "per_image": per_image}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # half-written or corrupt: skipped
            continue
    return out


def _fold_rows(run_dir: Path, row: dict, oofs: dict[int, dict], classes: list[int]) -> tuple[list[list], list[str]]:
    n_classes = len(classes)
    present = fold_dirs(run_dir)
    rows, notes = [], []
    for k in range(row["folds_total"]):
        d = present.get(k)
        s = read_json(d / "summary.json") if d else None
        m = _metrics(d / "metrics.csv") if d else None
        if s is None:
            done = 0 if m is None else len(m)
            status = "missing" if d is None else f"unfinished ({done} epochs)"
            notes.append(f"fold {k}: {status}")
            rows.append([f"fold{k}", status] + ["-"] * (5 + n_classes))
            continue
        per = [oofs[k]["per_class"].get(c) for c in classes] if k in oofs else [None] * n_classes
        rows.append([f"fold{k}", "finished", s.get("best_epoch"), _num(s.get("best_score"))]
                    + [_num(v) for v in per]
                    + [s.get("val_images"), _num(s.get("seconds_per_epoch"), ".2f"),
                       _num((s.get("seconds") or 0) / 60, ".1f"), _num(s.get("peak_memory_mb"), ".0f")])
    return rows, notes


def _worst(run_dir: Path, oofs: dict, cfg: dict, data, worst: int, tmp: Path, title: str = "Dice") -> str:
    """Truth | prediction sheet of the ``worst`` OOF images (lowest mean score over classes)."""

    if not oofs:
        return _note("no oof.npz in any fold: no out-of-fold images to show")
    ids = [i for o in oofs.values() for i in o["ids"]]
    labels = np.concatenate([o["labels"] for o in oofs.values()])
    score = np.concatenate([o["per_image"] for o in oofs.values()])
    order = np.argsort(score, kind="stable")[:worst]
    lines = ", ".join(f"{ids[i]} {score[i]:.3f}" for i in order)
    text = f"<p>Worst {len(order)} of {len(ids)} out-of-fold images (mean {title} over classes): {_e(lines)}</p>"
    if data is None:
        return text + _note("images not shown: pass --data (the dataset the run was trained on) to see them")
    try:

        _, _, split = prepare(Config.model_validate(cfg), data, quiet=True)  # a folder or a dataset file
        split = split.subset([ids[i] for i in order])
        if split.masks is None or split.masks.shape != labels[order].shape:
            raise KaggleCMRError(f"{data}: masks do not match the run's predictions in shape")
    except (KaggleCMRError, OSError, ValueError, KeyError) as exc:
        return text + _note(f"images not shown: {data}: cannot read them ({str(exc).splitlines()[0]})")
    sheet = contact_sheet(split.images, labels[order], [f"{ids[i]} {score[i]:.2f}" for i in order], tmp / "worst.png",
                          cols=4, scale=2, truth=split.masks)
    return text + "<p>Each pair: image with the true mask (left) and with the prediction (right).</p>" + \
        _img(sheet, "worst out-of-fold images")


def build_report(run_dir: str | os.PathLike, *, data: str | os.PathLike | None = None, worst: int = 12) -> str:
    """The report page of ``run_dir`` as one HTML string (PNG plots inlined)."""

    run_dir = Path(run_dir)
    row = read_run(run_dir)
    present = fold_dirs(run_dir)
    cfg = run_config(run_dir)  # none readable: the page says less, it does not fail
    ds = next((j for k in sorted(present) if (j := read_json(present[k] / "dataset.json"))), None)
    metric = described_metric(ds)
    title = metric.title
    n_classes = int(((cfg or {}).get("data") or {}).get("num_classes", len(row["per_class"]) + 1))
    classes = [int(c) for c in row["per_class"]] or metric.scored(n_classes)
    oofs = _oof_files(run_dir, metric)
    parts = [f"<h1>Run {_e(run_dir.name)}</h1><p><code>{_e(run_dir.resolve())}</code> · report written "
             f"{datetime.now():%Y-%m-%d %H:%M}</p>"]

    # ---- status and summary
    status = f"{len(row['folds_done'])} of {row['folds_total']} folds finished"
    if row["folds_missing"]:
        status += f"; missing or unfinished: {', '.join(f'fold{k}' for k in row['folds_missing'])}"
    parts.append(f"<h2>Summary</h2><p>{_e(status)}" + (" · full fit present" if row["full_fit"] else "") + "</p>")
    if row["oof"] is None:
        parts.append(_note("no out-of-fold score yet (oof.json is written when every fold has finished)"))
    params = row["parameters"]
    parts.append(_table([f"out-of-fold {title}", "fixed epoch", "with TTA", "with TTA + PP", "parameters", "model MB",
                         "s/epoch", "train minutes", "peak memory MB", "device"],
                        [[_num(row["oof"]), _num(row["oof_last"]), _num(row["oof_tta"]), _num(row["oof_pp"]),
                          "-" if params is None else f"{params:,}", _num(row["model_mb"], ".1f"),
                          _num(row["seconds_per_epoch"], ".2f"), _num(row["train_minutes"], ".1f"),
                          _num(row["peak_memory_mb"], ".0f"), row["device"] or "-"]], left=0))

    # ---- config and dataset
    diff = row["differs"]
    if diff is None:
        parts.append("<h2>Config</h2>" + _note("no readable config.yaml in any fold"))
    else:
        parts.append("<h2>Config</h2>" + (_table(["key (differs from the default recipe)", "value"],
                                                 [[k, json.dumps(v)] for k, v in diff.items()]) if diff else
                                          "<p>Same as the shipped default recipe.</p>"))
    if cfg:
        keys = ["model.arch", "model.encoder", "model.weights", "model.input_size", "data.size", "data.in_channels",
                "data.num_classes", "loss.name", "train.epochs", "train.batch_size", "train.lr", "train.optimizer",
                "train.amp", "infer.tta", "seed"]
        flat = flatten(cfg)
        parts.append("<details><summary>main settings</summary>" +
                     _table(["key", "value"], [[k, json.dumps(flat.get(k))] for k in keys if k in flat]) + "</details>")
    if ds is not None:
        parts.append("<h2>Dataset</h2>" + _table(["key", "value"], [[k, json.dumps(v)[:200]] for k, v in flatten(ds).items()]))

    # ---- per fold and per class
    fold_rows, notes = _fold_rows(run_dir, row, oofs, classes)
    cls = [f"class {k}" for k in classes]
    parts.append("<h2>Folds</h2>" + _table(["fold", "status", "best epoch", f"best {title}", *cls, "val images",
                                            "s/epoch", "minutes", "peak MB"], fold_rows, left=2))
    parts += [_note(n) for n in notes]
    oof_rows = [["out-of-fold (best epochs)", _num(row["oof"])] + [_num(row["per_class"].get(str(k))) for k in classes]]
    ens = read_json(run_dir / ENSEMBLE_OOF) if not row["folds_missing"] else None  # stale once a fold is gone
    for key, e in ((ens or {}).get("entries") or {}).items():
        oof_rows.append([f"ensemble OOF, TTA {key}", _num(e.get("score"))] +
                        [_num((e.get("per_class") or {}).get(str(k))) for k in classes])
        if e.get("postprocess"):
            p = e["postprocess"]
            oof_rows.append([f"ensemble OOF, TTA {key} + postprocessing", _num(p.get("score"))] +
                            [_num((p.get("per_class") or {}).get(str(k))) for k in classes])
    parts.append(_table(["", title, *cls], oof_rows))

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        histories = {f"fold{k}": m for k, d in sorted(present.items()) if (m := _metrics(d / "metrics.csv")) is not None}
        parts.append("<h2>Learning curves</h2>")
        if histories:
            parts.append(_img(plot_run_curves(histories, tmp / "curves.png", title=run_dir.name), "learning curves"))
        else:
            parts.append(_note("no metrics.csv in any fold"))
        bars = {f"fold{k}": {str(c): float(v) for c, v in o["per_class"].items()} for k, o in oofs.items()}
        if row["per_class"]:
            bars["OOF"] = row["per_class"]
        if bars:
            parts.append(_img(plot_class_dice(bars, tmp / "bars.png", title=f"out-of-fold {title} per class and fold"),
                              f"{title} per class"))
        parts.append("<h2>Worst out-of-fold images</h2>" + _worst(run_dir, oofs, cfg or {}, data, worst, tmp, title))

    # ---- postprocessing
    parts.append("<h2>Postprocessing</h2>")
    plan_path = run_dir / "postprocess.json"
    if plan_path.is_file():

        try:
            plan = load_plan(plan_path)
            parts.append(f"<p>Plan chosen on out-of-fold predictions: <code>{_e(describe_plan(plan))}</code></p>")
        except KaggleCMRError as exc:
            parts.append(_note(str(exc)))
    else:
        parts.append("<p>No plan yet (<code>kagglecmr ensemble --postprocess auto</code> chooses one).</p>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(run_dir.name)} report</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n")


def write_report(run_dir: str | os.PathLike, *, data: str | os.PathLike | None = None, worst: int = 12) -> Path:
    """Write ``<run_dir>/report.html`` atomically (replacing an earlier report) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KaggleCMRError(f"{run_dir}: run folder not found")
    if not fold_dirs(run_dir) and not (run_dir / "full").is_dir():
        raise KaggleCMRError(f"{run_dir}: no fold folders (not a run folder; train --fold 0..4 first)")
    if worst < 1:
        raise KaggleCMRError(f"--worst {worst}: must be >= 1")
    out = atomic_write_text(run_dir / REPORT, build_report(run_dir, data=data, worst=worst))
    print(f"wrote {out}", flush=True)
    return out
