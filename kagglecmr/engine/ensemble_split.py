"""One split of an ensemble written out: its images' labels at their own sizes, postprocessed and gated a block
of probabilities at a time, its score when labelled, its submission CSV and its masks.

:func:`~kagglecmr.engine.ensembler.run_ensemble` predicts the blocks; :func:`write_split` never holds more
than one block of probabilities unless the whole split's fit :data:`RESULT_PROBS_BYTES` (they are then returned).
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import numpy as np

from kagglecmr.data.loader import Split
from kagglecmr.engine.gate_runs import gated, presence_of, split_keep
from kagglecmr.engine.outputs import label_at_size, score_report, write_masks
from kagglecmr.engine.postprocess import apply_plan
from kagglecmr.formats.submission_csv import write_submission
from kagglecmr.utils.errors import KaggleCMRError

RESULT_PROBS_BYTES = 2 << 30  # a split's probabilities are returned (EnsembleResult.probs) up to this size, else None


def submission_path(loaded: list, split: str) -> Path:
    """``submissions/<runs>-<split>-<time>.csv``, not yet taken."""
    base = f"{'+'.join(r.name for r in loaded)}-{split}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out, n = Path("submissions") / f"{base}.csv", 1
    while out.exists():  # two runs within one second
        n += 1
        out = Path("submissions") / f"{base}-{n}.csv"
    return out


def _once(get):
    """``get`` called at most once (the cls head's probabilities of a split, shared by its blocks)."""
    memo = []

    def call():
        if not memo:
            memo.append(get())
        return memo[0]
    return call


def _rows(presence, start: int, n: int):
    return None if presence is None else presence[start:start + n]


def split_images(split: str, loaded: list, labelled: Split | None, ds, data_root) -> Split:
    """The images of ``split`` (``oof``: the labelled ones), with a warning when the models trained on them."""
    if split == "oof":
        if labelled is None:
            raise KaggleCMRError(f"{data_root}: --split oof needs labelled images (train/ or val/ with masks)")
        return labelled
    images = ds.load(split)  # the split's folder was checked on entry
    seen = {i for r in loaded for ids in r.holdout.values() for i in ids}
    if split != "test" and any(i in seen for i in images.ids):
        print(f"warning: the models trained on most '{split}' images; its score is optimistic "
              f"(use --split oof for an honest estimate)", flush=True)
    return images


def write_split(split: str, loaded: list, images: Split, blocks, plan, *, ds, dev, passes, w, batch_size, out,
                save_masks, t0, oof_presence=None) -> dict:
    """One split from its ``(start, probabilities)`` blocks: labels at each image's own size, postprocessed and
    gated, scored when it has masks, its CSV in the dataset's format (and masks in its own values). The
    probabilities are returned when they fit :data:`RESULT_PROBS_BYTES` (else ``probs`` is None)."""
    k = ds.num_classes
    keep_probs = split == "oof" or len(images) * k * int(np.prod(images.images.shape[1:3])) * 4 <= RESULT_PROBS_BYTES
    presence = _once(presence_of(loaded, images, split == "oof", dev, passes, w, batch_size, oof_presence))
    labels, preview, kept, sizes = [], [], [], images.sizes()
    for start, p in blocks:  # a block of images at a time: labels at each image's own size, then postprocessing
        keep = split_keep(plan, p, lambda s=start, n=len(p): _rows(presence(), s, n))  # gates (None: no gate)
        block = [label_at_size(q, hw) for q, hw in zip(p, sizes[start:start + len(p)])]
        if plan is not None:
            block = gated([apply_plan(m, plan, k) for m in block], keep)
        labels += block
        if save_masks is not None:
            preview += gated([apply_plan(m, plan, k) if plan is not None else m for m in p.argmax(1).astype(np.uint8)],
                             keep)
        kept += [p] if keep_probs else []
    probs = (kept[0] if len(kept) == 1 else np.concatenate(kept)) if keep_probs and kept else None
    if split != "oof" and ds.has_masks(split):  # a labelled split (e.g. a holdout test set): score it
        truth = {i: ds.read_mask(mp, resize=False) for i, _, mp in ds.items(split)}
        print(score_report(split, dict(zip(images.ids, labels)), truth, ds), flush=True)

    fmt = ds.submission
    rows = [row for i, m in zip(images.ids, labels) for row in fmt.rows(i, m, k)]
    out = out or submission_path(loaded, split)
    write_submission(rows, out, shape={i: m.shape for i, m in zip(images.ids, labels)}, overwrite=False, fmt=fmt)
    empty = {c: int(sum(1 for m in labels if not (m == c).any())) for c in fmt.row_classes(k)}
    print(f"wrote {len(rows)} rows for {len(images)} images to {out} "
          f"(empty rows per class: {', '.join(f'{c}: {v}' for c, v in empty.items())}) in {time.time() - t0:.1f}s",
          flush=True)
    if save_masks is not None:
        write_masks(save_masks, images.ids, labels, images.images, ds=ds, preview=preview)
    return {"out": str(out), "rows": len(rows), "empty": empty, "plan": plan, "ids": list(images.ids), "probs": probs,
            "labels": labels, "truth": images.masks, "tta": passes, "runs": [str(r.path) for r in loaded],
            "metric": ds.metric, "num_classes": k}
