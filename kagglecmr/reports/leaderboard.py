"""The local leaderboard: one summary row per run folder, read from what training and ensembling
left on disk (``kagglecmr runs``).

A run folder is any folder under ``--runs-dir`` (nested too: ``runs/bench/default``) with
``fold<k>/`` or ``full/`` subfolders holding a ``config.yaml``.  Nothing is recomputed and nothing
is made up: a number that no file records is ``None`` (shown as ``-``).

Sources: ``fold<k>/config.yaml``, ``env.json`` (device, parameters, peak memory), ``summary.json``
(best epoch and score, seconds), ``best.safetensors`` (size), the run's ``oof.json`` (out-of-fold
score of the best epochs; a fixed-epoch score under ``score_last`` when present) and
``ensemble_oof.json`` (written by ``ensemble`` for a single run: OOF score per TTA set, with the
OOF-chosen postprocessing).  Every score is the dataset's metric, which the ``metric`` column names
(``dice`` for runs recorded before metrics were configurable).  Pure: no torch import.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import yaml

from kagglecmr.cfg.config import Config, load_config
from kagglecmr.engine.rundir import ENSEMBLE_OOF, read_json
from kagglecmr.formats.competition_metric import Metric
from kagglecmr.utils.errors import KaggleCMRError

SECTION_ORDER = ["model", "loss", "train", "data", "augment", "infer"]  # what the short table names first
IGNORED_KEYS = ("name", "train.device", "train.threads", "train.log")  # where a run ran, not what it is


# ------------------------------------------------------------------------------------ reading
def read_yaml(path: Path) -> dict | None:
    try:
        obj = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return obj if isinstance(obj, dict) else None


def find_runs(runs_dir: str | os.PathLike) -> list[Path]:
    """Run folders under ``runs_dir`` (sorted); a missing ``runs_dir`` is an error."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise KaggleCMRError(f"{runs_dir}: runs folder not found")
    found = {p.parent.parent for p in runs_dir.rglob("config.yaml") if _is_fold_dir(p.parent)}
    return sorted(found)


def _is_fold_dir(d: Path) -> bool:
    return d.name == "full" or bool(re.fullmatch(r"fold\d+", d.name))


def fold_dirs(run_dir: Path) -> dict[int, Path]:
    """``{k: run_dir/fold<k>}`` of the fold folders present."""
    return {int(d.name[4:]): d for d in Path(run_dir).glob("fold*") if d.is_dir() and d.name[4:].isdigit()}


def run_config(run_dir: Path) -> dict:
    """The first readable ``config.yaml`` of the run's folds (then ``full/``); ``{}`` when none is."""
    dirs = [d for _, d in sorted(fold_dirs(run_dir).items())] + [Path(run_dir) / "full"]
    return next((c for d in dirs if (c := read_yaml(d / "config.yaml"))), {})


def default_config() -> dict:
    """The shipped ``default`` recipe as a dict (the built-in defaults when it is not found)."""

    try:
        return load_config("default").to_dict()
    except KaggleCMRError:
        return Config().to_dict()


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(cfg: dict, base: dict | None = None) -> dict:
    """Dotted keys whose value differs from ``base`` (the default recipe), where-it-ran keys left out."""
    a, b = flatten(cfg), flatten(base if base is not None else default_config())
    return {k: a.get(k) for k in sorted(set(a) | set(b))
            if k not in IGNORED_KEYS and a.get(k) != b.get(k) and k in a}


def n_folds_of(run_dir: Path, summaries: dict[int, dict]) -> int:
    """How many CV folds the run has: one more than the highest fold folder, or, when folds at the end
    are missing, the count implied by a finished fold's sizes (``(train + val) / val`` images)."""
    present = fold_dirs(run_dir)
    n = max(present) + 1 if present else 0
    implied = [round((s["train_images"] + s["val_images"]) / s["val_images"]) for s in summaries.values()
               if isinstance(s.get("val_images"), int) and s["val_images"] > 0 and isinstance(s.get("train_images"), int)]
    return max([n, int(np.median(implied))] if implied else [n])


def _mean(values) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def ensemble_scores(record: dict | None, tta: list[str] | None) -> tuple[float | None, float | None, dict]:
    """(OOF with TTA, OOF with TTA + postprocessing, the entry) from ``ensemble_oof.json``: the entry of
    the config's TTA set, else the best entry with more than one pass; PP falls back to the plain entry."""
    entries = (record or {}).get("entries", {})
    key = "+".join(tta) if tta else None
    multi = {k: v for k, v in entries.items() if "+" in k}
    pick = multi.get(key) if key in multi else (max(multi.values(), key=lambda e: e.get("score", -1)) if multi else None)
    base = pick or entries.get("none")
    pp = (base or {}).get("postprocess", {}).get("score")
    return (pick or {}).get("score"), pp, (base or {})


def metric_label(*records: dict | None) -> str:
    """The short name of the metric the first record naming one holds (``oof.json``, ``summary.json``);
    ``dice`` for runs recorded before metrics were configurable."""
    for rec in records:
        if isinstance(rec, dict) and rec.get("metric"):
            try:
                return Metric.from_dict(rec["metric"]).label
            except KaggleCMRError:
                return "?"
    return Metric().label


def read_run(run_dir: str | os.PathLike, runs_dir: str | os.PathLike | None = None, base: dict | None = None) -> dict:
    """One leaderboard row: everything known about a run folder, JSON-ready (unknown = None)."""
    run_dir = Path(run_dir)
    present = fold_dirs(run_dir)
    summaries = {k: s for k, d in present.items() if (s := read_json(d / "summary.json")) is not None}
    n = n_folds_of(run_dir, summaries)
    cfg = run_config(run_dir)
    env = next((e for k in sorted(summaries) if (e := read_json(present[k] / "env.json"))), None) or {}
    oof = read_json(run_dir / "oof.json") or {}
    complete = n > 0 and len(summaries) >= n
    ens = read_json(run_dir / ENSEMBLE_OOF) if complete else None
    tta, pp, _ = ensemble_scores(ens, (cfg.get("infer") or {}).get("tta"))
    best = next((present[k] / "best.safetensors" for k in sorted(summaries)
                 if (present[k] / "best.safetensors").is_file()), None)
    name = str(run_dir.relative_to(runs_dir)) if runs_dir is not None and run_dir.is_relative_to(runs_dir) else run_dir.name
    return {
        "name": name,
        "path": str(run_dir),
        "differs": config_diff(cfg, base) if cfg else None,  # None: no readable config.yaml
        "folds_done": sorted(summaries),
        "folds_total": n,
        "folds_missing": [k for k in range(n) if k not in summaries],  # absent or unfinished
        "folds_unfinished": [k for k in range(n) if k in present and k not in summaries],
        "metric": metric_label(oof, *summaries.values()),
        "full_fit": (run_dir / "full" / "summary.json").is_file(),
        "fold_scores": {str(k): s.get("best_score") for k, s in sorted(summaries.items())},
        "best_epochs": {str(k): s.get("best_epoch") for k, s in sorted(summaries.items())},
        "fold_mean": _mean(s.get("best_score") for s in summaries.values()),
        "oof": oof.get("score") if complete else None,  # a missing fold makes an older oof.json stale
        "oof_last": oof.get("score_last") if complete else None,
        "oof_tta": tta,
        "oof_pp": pp,
        "per_class": (oof.get("per_class") or {}) if complete else {},
        "parameters": env.get("parameters"),
        "model_mb": round(best.stat().st_size / 1e6, 2) if best is not None else None,
        "seconds_per_epoch": _mean(s.get("seconds_per_epoch") for s in summaries.values()),
        "train_minutes": (sum(s.get("seconds") or 0.0 for s in summaries.values()) / 60) if summaries else None,
        "peak_memory_mb": max((s["peak_memory_mb"] for s in summaries.values()
                               if isinstance(s.get("peak_memory_mb"), (int, float))), default=None),
        "epochs": (cfg.get("train") or {}).get("epochs"),
        "device": env.get("device_name") or env.get("device"),
    }


def list_runs(runs_dir: str | os.PathLike = "runs") -> list[dict]:
    """Every run under ``runs_dir``, best OOF first (with TTA/PP/fold mean as tie-breaks); runs
    without an OOF score last (by their fold mean), then by name."""
    base = default_config()
    rows = [read_run(d, runs_dir, base) for d in find_runs(runs_dir)]

    def key(r):
        score = r["oof"] if r["oof"] is not None else None
        return (score is None, -(score or 0.0), r["fold_mean"] is None, -(r["fold_mean"] or 0.0), r["name"])

    return sorted(rows, key=key)


# ------------------------------------------------------------------------------------ printing
COLUMNS = [("run", "name"), ("differs from default", "differs"), ("folds", "folds"), ("metric", "metric"), ("OOF", "oof"),
           ("OOF last", "oof_last"), ("+TTA", "oof_tta"), ("+PP", "oof_pp"), ("per class", "per_class"),
           ("params", "parameters"), ("MB", "model_mb"), ("s/epoch", "seconds_per_epoch"),
           ("train min", "train_minutes"), ("device", "device")]


def _short(v, width: int = 28) -> str:
    s = str(v)
    if isinstance(v, float):
        s = f"{v:g}"
    elif isinstance(v, list):
        s = "[" + ",".join(_short(x, width) for x in v) + "]"
    return s if len(s) <= width else s[: width - 1] + "…"


def _cells(r: dict, max_keys: int = 3) -> dict[str, str]:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    differs = r["differs"] if r["differs"] is not None else {}
    keys = sorted(differs, key=lambda k: (SECTION_ORDER.index(k.split(".")[0]) if k.split(".")[0] in SECTION_ORDER
                                                else len(SECTION_ORDER), k))
    diff = [f"{k.split('.', 1)[-1]}={_short(differs[k], 20)}" for k in keys]
    text = ", ".join(diff[:max_keys]) + (f" (+{len(diff) - max_keys})" if len(diff) > max_keys else "")
    folds = f"{len(r['folds_done'])}/{r['folds_total']}"
    absent = [k for k in r["folds_missing"] if k not in r["folds_unfinished"]]
    said = [f"missing {','.join(map(str, absent))}"] if absent else []
    said += [f"unfinished {','.join(map(str, r['folds_unfinished']))}"] if r["folds_unfinished"] else []
    if said:
        folds += " (" + "; ".join(said) + ")"
    if r["full_fit"]:
        folds += " +full"
    oof = num(r["oof"], ".4f")
    if r["oof"] is None and r["fold_mean"] is not None:
        oof = f"({r['fold_mean']:.4f} fold mean)"
    params = r["parameters"]
    return {
        "name": r["name"], "differs": "?" if r["differs"] is None else (text or "-"), "folds": folds,
        "metric": r.get("metric") or "-", "oof": oof,
        "oof_last": num(r["oof_last"], ".4f"), "oof_tta": num(r["oof_tta"], ".4f"), "oof_pp": num(r["oof_pp"], ".4f"),
        "per_class": " ".join(f"{k}:{v:.3f}" for k, v in r["per_class"].items()) or "-",
        "parameters": "-" if params is None else (f"{params / 1e6:.2f}M" if params >= 1e5 else f"{params / 1e3:.1f}k"),
        "model_mb": num(r["model_mb"], ".1f"), "seconds_per_epoch": num(r["seconds_per_epoch"], ".2f"),
        "train_minutes": num(r["train_minutes"], ".1f"), "device": str(r["device"] or "-"),
    }


def format_runs_table(rows: list[dict]) -> str:
    """Plain text: one aligned line per run under a header (what a log or a pipe gets)."""
    cells = [_cells(r) for r in rows]
    widths = {k: max([len(h)] + [len(c[k]) for c in cells]) for h, k in COLUMNS}
    lines = ["  ".join(h.ljust(widths[k]) for h, k in COLUMNS).rstrip()]
    lines += ["  ".join(c[k].ljust(widths[k]) for _, k in COLUMNS).rstrip() for c in cells]
    return "\n".join(lines)


def print_runs(rows: list[dict], *, as_json: bool = False, file=None) -> None:
    """``--json``: one JSON array; a rich table on a terminal; :func:`format_runs_table` otherwise."""
    file = file or sys.stdout
    if as_json:
        print(json.dumps(rows, indent=1), file=file)
        return
    if not rows:
        print("no runs found", file=file)
        return
    if file.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(show_lines=False)
        for h, k in COLUMNS:
            table.add_column(h, justify="right" if k not in ("name", "differs", "per_class", "device", "folds", "metric")
                             else "left")
        for c in map(_cells, rows):
            table.add_row(*(c[k] for _, k in COLUMNS))
        needed = len(format_runs_table(rows).splitlines()[0]) + 3 * len(COLUMNS) + 1  # never squeeze cells to "…"
        console = Console(file=file)
        console.width = max(console.width, needed)
        console.print(table)
    else:
        print(format_runs_table(rows), file=file)


def run_runs(runs_dir: str | os.PathLike = "runs", *, as_json: bool = False) -> list[dict]:
    rows = list_runs(runs_dir)
    print_runs(rows, as_json=as_json)
    return rows
