"""Cross-validation benchmark: train every fold of one or more recipes on a dataset and print one
table row per recipe: first the honest OOF Dice (each fold's last epoch: a fixed rule, not chosen on
the fold it is scored on; the SWA model's when the recipe averages weights), then the OOF of the
models the recipe keeps (``train.select``; the default keeps each fold's best epoch, which is
optimistic) overall and per class (RV, Myo, LV), plain, with flip TTA and with OOF-chosen
postprocessing, plus training minutes and seconds per epoch (data vs model).

    python benchmarks/cv.py --data ../shared/data/cmr --exp default
    python benchmarks/cv.py --data ../shared/data/cmr --exp lite0=offline --exp r18=default:model.encoder=resnet18,model.weights=none

An experiment is ``NAME=CONFIG[:key=value,key=value]`` (or just ``CONFIG``).  Folds come from
``--folds`` (made with make-folds' defaults when the file does not exist yet).  ``--parallel N``
trains up to N recipes at once in separate processes (useful on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

from kagglecmr.cfg.config import load_config  # noqa: E402
from kagglecmr.data.dataset import prepare  # noqa: E402
from kagglecmr.engine.ensembler import load_run, predict_oof  # noqa: E402
from kagglecmr.engine.postprocess import apply_plan, describe_plan, tune_plan  # noqa: E402
from kagglecmr.formats.metric import dice_table  # noqa: E402
from kagglecmr.utils.runtime import resolve_device, setup_threads  # noqa: E402

HEADER = ("| recipe | honest OOF (last / swa) | OOF (select) | OOF+TTA | OOF+TTA+PP | RV | Myo | LV | empty rows | PP plan | train min | s/epoch | "
          "data s/epoch | device |")


def parse_exp(text: str) -> tuple[str, str, list[str]]:
    """``NAME=CONFIG:k=v,k=v`` -> (name, config, overrides); commas inside [...] stay in the value."""
    head, _, sets = text.partition(":")
    name, _, config = head.partition("=")
    parts, depth, cur = [], 0, ""
    for ch in sets:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return name, config or name, [p for p in parts if p]


def train_recipe(name, config, sets, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kagglecmr", "train", "--fold", args.folds_spec, "--config", config,
           "--data", str(args.data), "--folds", str(args.folds), "--runs-dir", str(args.runs_dir), "--name", name,
           "--quiet", "--device", args.device, "--jobs", str(args.jobs)]
    for s in sets:
        cmd += ["--set", s]
    log = open(Path(args.runs_dir) / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def evaluate(name: str, args) -> str:
    run_dir = Path(args.runs_dir) / name
    dev = resolve_device(args.device)
    run = load_run(run_dir, dev)
    data = prepare(run.cfg, args.data, quiet=True)[2]  # at the run's size and channels
    k = run.cfg.data.num_classes
    w = np.ones(1)
    plain = predict_oof([run], data, dev, ["none"], w, 64).argmax(1)
    tta = predict_oof([run], data, dev, list(run.cfg.infer.tta), w, 64).argmax(1)
    plan, _, _, _ = tune_plan(tta.astype(np.uint8), data.masks, k)
    pp = dice_table(apply_plan(tta.astype(np.uint8), plan, k), data.masks, k)
    s = [json.loads(p.read_text()) for p in sorted(run_dir.glob("fold*/summary.json"))]
    empty = int(((data.masks[:, None] == np.arange(1, k)[None, :, None, None]).sum((2, 3)) == 0).sum())
    env = json.loads((run_dir / "fold0" / "env.json").read_text())
    oof = json.loads((run_dir / "oof.json").read_text()) if (run_dir / "oof.json").is_file() else {}
    honest = " / ".join(f"{oof[key]:.4f}" for key in ("score_last", "score_swa") if key in oof) or "n/a"
    select = oof.get("select", "best")
    return (f"| {name} | {honest} | {dice_table(plain, data.masks, k).mean():.4f} ({select}) | {dice_table(tta, data.masks, k).mean():.4f} "
            f"| {pp.mean():.4f} | " + " | ".join(f"{pp[:, c].mean():.4f}" for c in range(k - 1)) +
            f" | {empty} | {describe_plan(plan)} | {sum(x['seconds'] for x in s) / 60:.1f} "
            f"| {np.mean([x['seconds_per_epoch'] for x in s]):.2f} | {np.mean([x['data_seconds_per_epoch'] for x in s]):.3f} "
            f"| {env['device_name']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cmr"))
    ap.add_argument("--folds", type=Path, default=Path("folds/folds.csv"))
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/bench"))
    ap.add_argument("--exp", action="append", required=True, help="NAME=CONFIG[:k=v,k=v] (repeatable)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--parallel", type=int, default=1, help="recipes trained at once")
    ap.add_argument("--jobs", type=int, default=1, help="folds of one recipe trained at once (train --jobs)")
    ap.add_argument("--folds-spec", default="0..4")
    ap.add_argument("--out", type=Path, help="append the rows to this markdown file")
    args = ap.parse_args()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    if not args.folds.is_file():
        subprocess.run([sys.executable, "-m", "kagglecmr", "make-folds", "--data", str(args.data), "--out",
                        str(args.folds)], check=True)
    exps = [parse_exp(e) for e in args.exp]
    for _name, config, sets in exps:
        load_config(config, sets)  # fail before training anything
    t0 = time.time()
    pending, running = list(exps), []
    while pending or running:
        while pending and len(running) < args.parallel:
            name, config, sets = pending.pop(0)
            running.append((name, train_recipe(name, config, sets, args)))
        time.sleep(1)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                status = "ok" if item[1].returncode == 0 else f"FAILED ({item[1].returncode}), see {item[0]}.log"
                print(f"{item[0]}: trained {status} at {time.time() - t0:.0f}s", flush=True)
    setup_threads(0)
    rows = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for name, _, _ in exps:
        try:
            rows.append(evaluate(name, args))
        except Exception as exc:  # noqa: BLE001 - report and go on with the other recipes
            rows.append(f"| {name} | failed: {type(exc).__name__}: {exc} |")
    table = "\n".join(rows)
    print(table)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
