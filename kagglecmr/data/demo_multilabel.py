"""A synthetic dataset with overlapping classes (``kagglecmr demo-data DIR --kind multilabel``).

Each RGB image holds up to three shapes on a noisy, textured background: a **square** (it lifts the red
channel), a **circle** (green) and a **bar** (blue).  They are placed near the centre, so they overlap often,
and where they do, every class is there at once (a pixel may be square *and* circle): the task needs one
sigmoid per class.  Each class is in about 70 % of the images.

The masks lie one binary file per image and class (0/255), as many such competitions ship them:
``<split>/masks/<class>/<id>_<class>.png``; where a class is absent its file is left out for about half the
images (a missing file is an empty class) and written empty for the others.  ``dataset.yaml`` beside the
splits describes it (``task: multilabel``), so ``--data DIR`` reads it directly.  The same seed gives
byte-identical files; the dataset is written to a temporary sibling folder and renamed into place.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from kagglecmr.data.dataset import DATASET_FILE
from kagglecmr.data.demo import _check_args, _check_target, _png, _smooth_noise, _swap_in
from kagglecmr.data.loader import SPLITS
from kagglecmr.utils.io import atomic_write_bytes, atomic_write_text

CLASSES = ("square", "circle", "bar")
PRESENT = 0.7  # each class is in this share of the images
DROP_EMPTY = 0.5  # an absent class's file is left out for this share of the images

DATASET_YAML = """\
# kagglecmr demo-data --kind multilabel: overlapping shapes, one mask file per image and class
name: shapes
task: multilabel
classes: [square, circle, bar]
splits:
{splits}mask_values: auto
missing: empty
submission: {{id: "{{id}}_{{name}}", header: [Image_Label, EncodedPixels]}}
"""


def make_shapes(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image uint8 [size, size, 3], masks bool [3, size, size])`` pair (square, circle, bar)."""
    s = size / 64.0
    img = np.full((size, size, 3), rng.uniform(20, 60), np.float32)
    for c in range(3):
        img[:, :, c] += _smooth_noise(rng, size, int(rng.integers(4, 8)), rng.uniform(8, 16))
    masks = np.zeros((3, size, size), np.uint8)
    centre = size / 2
    present = rng.random(3) < PRESENT
    if present[0]:
        half = rng.uniform(8, 16) * s
        x, y = centre + rng.normal(0, 7 * s), centre + rng.normal(0, 7 * s)
        cv2.rectangle(masks[0], (int(x - half), int(y - half)), (int(x + half), int(y + half)), 1, -1)
    if present[1]:
        r = rng.uniform(7, 14) * s
        cv2.circle(masks[1], (int(centre + rng.normal(0, 8 * s)), int(centre + rng.normal(0, 8 * s))), int(r), 1, -1)
    if present[2]:
        y, h = int(centre + rng.normal(0, 10 * s)), int(rng.uniform(3, 7) * s)
        x0, x1 = int(rng.uniform(0, 0.3) * size), int(rng.uniform(0.7, 1.0) * size)
        cv2.rectangle(masks[2], (x0, y - h), (x1, y + h), 1, -1)
    for c in range(3):
        img[:, :, c] += masks[c] * rng.uniform(90, 150)
    img += rng.normal(0, rng.uniform(4, 10), img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), masks.astype(bool)


def _write(root: Path, counts: dict[str, int], seed: int, size: int) -> dict:
    rng = np.random.default_rng(seed)
    n, present, missing, both = 1, np.zeros(3, np.int64), 0, 0
    for split, count in counts.items():
        labelled = split != "test"
        for _ in range(count):
            image, masks = make_shapes(rng, size)
            name = f"img{n}"
            atomic_write_bytes(root / split / "images" / f"{name}.png", _png(image[:, :, ::-1]))  # RGB -> BGR
            drop = rng.random(3) < DROP_EMPTY
            if labelled:
                for c, cls in enumerate(CLASSES):
                    if not masks[c].any() and drop[c]:
                        missing += 1
                        continue
                    atomic_write_bytes(root / split / "masks" / cls / f"{name}_{cls}.png",
                                       _png(masks[c].astype(np.uint8) * 255))
                present += masks.any(axis=(1, 2))
                both += int((masks.sum(0) > 1).any())
            n += 1
    return {"class_images": dict(zip(CLASSES, present.tolist())), "missing_files": missing,
            "images_with_overlap": both}


def _yaml(counts: dict[str, int]) -> str:
    lines = []
    for split in counts:
        mask = f', mask: "{split}/masks/{{name}}/{{id}}_{{name}}.png"' if split != "test" else ""
        lines.append(f'  {split}: {{image: "{split}/images/{{id}}.png"{mask}}}\n')
    return DATASET_YAML.format(splits="".join(lines))


def make_multilabel_demo(out, n_train: int = 60, n_val: int = 12, n_test: int = 24, seed: int = 0, size: int = 96,
                         force: bool = False) -> dict:
    """Write the overlapping-shapes dataset to ``out`` (``dataset.yaml`` + ``train/``, ``val/``, ``test/``);
    an existing non-empty ``out`` is refused unless ``force`` and it holds nothing else.  Returns a summary."""
    _check_args(n_train, n_val, n_test, size)
    out = Path(out)
    replace = _check_target(out, force, allowed=(*SPLITS, DATASET_FILE))
    counts = {s: k for s, k in zip(SPLITS, (n_train, n_val, n_test)) if k > 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)
    try:
        stats = _write(tmp, counts, seed, size)
        atomic_write_text(tmp / DATASET_FILE, _yaml(counts))
        _swap_in(tmp, out, replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    summary = {"out": str(out), "kind": "multilabel", "seed": seed, "size": size, "train": n_train, "val": n_val,
               "test": n_test, **stats}
    print(f"demo-data: wrote {n_train} train + {n_val} val (one mask file per class, {stats['missing_files']} "
          f"left out as empty) + {n_test} test images ({size}x{size}, seed {seed}, classes {', '.join(CLASSES)}; "
          f"{stats['images_with_overlap']} labelled images with overlapping classes) to {out}")
    return summary
