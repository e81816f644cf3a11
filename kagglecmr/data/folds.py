"""Stratified, grouped, deterministic k-fold splits over every labelled image.

* **Stratification**: each image gets a stratum made of which foreground classes it contains
  and a quantile bin of its heart size (LV + myocardium area; small apical vs large basal
  slices).  Strata with fewer members than folds are merged into coarser ones.  Overlapping classes
  (``task: multilabel``, packed masks) stratify the same way on each class's own presence.
* **Groups (leakage guard)**: near-duplicate images, e.g. the end-diastole / end-systole frames
  of one slice, must land in the same fold, or the out-of-fold score is optimistic.  The dataset
  file's ``group`` regex names the groups; without one, :mod:`kagglecmr.data.similarity` groups
  images whose texture is alike (complete linkage: every pair in a group is similar), a group at
  most :func:`similarity_cap` images.
* **Balance**: :func:`fold_problems` flags a fold whose size is off the mean by more than
  ``BALANCE_TOLERANCE`` (25 %) or that misses a class at least ``MIN_CLASS_IMAGES`` images have;
  ``make-folds`` then refuses to write (exit 2) unless ``--allow-unbalanced``, and so it does for a
  regex group that no fold can hold (more than the mean fold + 25 %).
* **Determinism**: rows are in natural id order, folds come from
  ``StratifiedGroupKFold(shuffle=True, random_state=seed)``; the same data and seed give a
  byte-identical CSV.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from kagglecmr.cfg.config import Config, DataConfig, DataSpec
from kagglecmr.data.dataset import apply_dataset, load_dataset
from kagglecmr.data.loader import Split
from kagglecmr.data.rows import blocks
from kagglecmr.data.similarity import (  # noqa: F401 (image_similarity, similarity_groups: re-exported)
    SIMILARITY_THRESHOLD,
    image_similarity,
    similarity_clusters,
    similarity_groups,
)
from kagglecmr.utils.errors import DataError, KaggleCMRError
from kagglecmr.utils.io import atomic_write_text
from kagglecmr.utils.naming import natural_key

SIZE_BINS = 3
BALANCE_TOLERANCE = 0.25  # a fold's size may be off the mean (images / folds) by this share
MIN_CLASS_IMAGES = 5  # a class in at least this many images (and at least one per fold) must be in every fold
CMR_CLASS_NAMES = {1: "RV", 2: "Myo", 3: "LV"}
REQUIRED_COLUMNS = ("id", "fold")


# --------------------------------------------------------------------------- stratification


def _size_column(num_classes: int) -> str:
    return "lv_myo_area" if num_classes == 4 else "fg_area"


def _quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-count bins by rank (ties broken by position, so always deterministic)."""
    n = len(values)
    ranks = np.empty(n, np.int64)
    ranks[np.argsort(values, kind="stable")] = np.arange(n)
    return (ranks * n_bins // max(n, 1)).astype(np.int64)


def merge_rare_strata(fine: list[str], coarse: list[str], min_count: int) -> list[str]:
    """Merge strata with fewer than ``min_count`` members.

    A rare fine stratum falls back to its coarse one; a still-rare label joins a shared
    ``rare`` stratum; a rare ``rare`` stratum joins the most common label.
    """
    labels = list(fine)
    counts = pd.Series(labels).value_counts()
    labels = [c if counts[f] < min_count else f for f, c in zip(labels, coarse)]
    counts = pd.Series(labels).value_counts()
    labels = [lab if counts[lab] >= min_count else "rare" for lab in labels]
    counts = pd.Series(labels).value_counts()
    if 0 < counts.get("rare", 0) < min_count and len(counts) > 1:
        common = min(counts.drop("rare").items(), key=lambda kv: (-kv[1], kv[0]))[0]
        labels = [common if lab == "rare" else lab for lab in labels]
    return labels


def fold_features(masks: np.ndarray, num_classes: int = 4, *, n_folds: int = 5, n_bins: int = SIZE_BINS,
                  multilabel: bool = False) -> pd.DataFrame:
    """Per-image stratification features of label masks ``[N, H, W]``.

    Columns: ``has_k`` (0/1) and ``area_k`` (pixels) for each foreground class ``k``, the size
    used for binning (``lv_myo_area`` = classes 2+3 for 4-class CMR, else ``fg_area`` = all
    foreground), its quantile ``size_bin`` and the ``stratum`` label (present classes + size
    bin, rare strata merged so each has at least ``n_folds`` members).  ``multilabel``: the masks are packed
    maps of ``num_classes - 1`` overlapping classes (bit ``k - 1`` = class ``k``); the size is their summed area.
    """
    if num_classes < 2:
        raise KaggleCMRError(f"num_classes must be at least 2 (got {num_classes})")
    areas = np.zeros((len(masks), num_classes), np.int64)
    for start, block in blocks(masks):  # a block of masks at a time (the cache's lazy rows stay on disk)
        flat = np.asarray(block).reshape(len(block), -1)
        for k in range(1, num_classes):
            inside = (flat >> (k - 1)) & 1 == 1 if multilabel else flat == k
            areas[start:start + len(block), k] = inside.sum(axis=1)
    feats: dict[str, np.ndarray] = {}
    for k in range(1, num_classes):
        feats[f"area_{k}"] = areas[:, k]
    for k in range(1, num_classes):
        feats[f"has_{k}"] = (feats[f"area_{k}"] > 0).astype(np.int64)
    size_col = "fg_area" if multilabel else _size_column(num_classes)
    size_classes = (2, 3) if size_col == "lv_myo_area" else range(1, num_classes)
    feats[size_col] = sum(feats[f"area_{k}"] for k in size_classes)
    df = pd.DataFrame(feats)
    df["size_bin"] = _quantile_bins(df[size_col].to_numpy(), n_bins)
    presence = ["p" + "".join(str(v) for v in row) for row in df[[f"has_{k}" for k in range(1, num_classes)]].to_numpy()]
    fine = [f"{p}_s{b}" for p, b in zip(presence, df["size_bin"])]
    df["stratum"] = merge_rare_strata(fine, presence, n_folds)
    return df


# --------------------------------------------------------------------------- folds


def _natural_order(split: Split) -> Split:
    order = sorted(range(len(split)), key=lambda k: natural_key(split.ids[k]))
    return split.subset([split.ids[k] for k in order])


def similarity_cap(n_images: int, n_folds: int) -> int:
    """The most images one similarity group may hold: ``BALANCE_TOLERANCE`` of a mean fold, at least 2.

    A fold can then take or leave any one group and stay within the balance tolerance.  Near-duplicates
    come in pairs or small sets (the ED/ES frames of a slice); a larger set of alike images is cut.
    """
    return max(2, int(BALANCE_TOLERANCE * n_images / n_folds))


def make_folds(split: Split, n_folds: int = 5, seed: int = 42, groups: bool = True, num_classes: int = 4,
               group_of=None, multilabel: bool = False) -> pd.DataFrame:
    """Assign every labelled image of ``split`` to one of ``n_folds`` folds.

    Returns one row per image in natural id order with ``id, split, fold, group, stratum``
    and the :func:`fold_features` columns.  ``groups=False`` makes every image its own group;
    ``group_of`` (ids -> group names, e.g. a dataset's ``group`` regex) replaces the similarity guard,
    whose groups hold at most :func:`similarity_cap` images; ``attrs["similarity_cut"]`` lists the sizes
    of the sets of alike images that cap cut.
    """
    if split.masks is None:
        raise DataError("make_folds needs labelled images (masks)")
    if n_folds < 2:
        raise KaggleCMRError(f"--n-folds must be at least 2 (got {n_folds})")
    split = _natural_order(split)
    n = len(split)
    cut: list[int] = []
    if groups and group_of is not None:
        group = pd.factorize(pd.Series(group_of(split.ids)), sort=False)[0].astype(np.int64)
    elif groups:
        group, cut = similarity_clusters(split.images, max_size=similarity_cap(n, n_folds))
    else:
        group = np.arange(n, dtype=np.int64)
    n_groups = int(group.max()) + 1 if n else 0
    if n_folds > n_groups:
        what = ("groups" if group_of is not None else "groups of near-duplicate images") if groups else "images"
        raise KaggleCMRError(f"--n-folds {n_folds} is more than the {n_groups} {what} ({n} labelled images)")
    feats = fold_features(split.masks, num_classes, n_folds=n_folds, multilabel=multilabel)
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(n, -1, np.int64)
    for k, (_, test_idx) in enumerate(cv.split(np.zeros((n, 1)), feats["stratum"], group)):
        fold[test_idx] = k
    head = pd.DataFrame({
        "id": split.ids,
        "split": split.splits or ["train"] * n,
        "fold": fold,
        "group": group,
    })
    df = pd.concat([head, feats[["stratum", "size_bin"] + [c for c in feats if c not in ("stratum", "size_bin")]]],
                   axis=1)
    df.attrs["similarity_cut"] = cut
    return df


def _class_columns(df: pd.DataFrame, class_names: list[str] | None) -> dict[str, str]:
    """``has_k`` column -> class name (CMR names for 3 foreground classes, else ``classK``, or ``class_names``)."""
    has_cols = [c for c in df.columns if c.startswith("has_")]
    names = {c: CMR_CLASS_NAMES.get(int(c[4:]), f"class{c[4:]}") if len(has_cols) == 3 else f"class{c[4:]}"
             for c in has_cols}
    if class_names is not None and class_names[1:] != [f"class{k}" for k in range(1, len(class_names))]:
        names = {c: class_names[int(c[4:])] if int(c[4:]) < len(class_names) else names[c] for c in has_cols}
    return names


def fold_problems(df: pd.DataFrame, class_names: list[str] | None = None) -> dict[int, list[str]]:
    """What is off per fold (only folds with a problem): a size off the mean by more than
    ``BALANCE_TOLERANCE``, or a missing class that at least ``max(MIN_CLASS_IMAGES, folds)`` images have."""
    k = int(df["fold"].max()) + 1
    mean = len(df) / k
    sizes = df["fold"].value_counts().reindex(range(k), fill_value=0)
    out: dict[int, list[str]] = {}
    for f, size in sizes.items():
        if abs(size - mean) > BALANCE_TOLERANCE * mean + 1e-9:
            side = "above" if size > mean else "below"
            out.setdefault(int(f), []).append(f"{size} images, {abs(size / mean - 1):.0%} {side} the mean {mean:.1f} "
                                              f"(±{BALANCE_TOLERANCE:.0%} allowed)")
    for col, name in _class_columns(df, class_names).items():
        total = int(df[col].sum())
        if total >= max(MIN_CLASS_IMAGES, k):
            per_fold = df[col].groupby(df["fold"]).sum().reindex(range(k), fill_value=0)
            for f in per_fold.index[per_fold == 0]:
                out.setdefault(int(f), []).append(f"no {name} image ({total} overall)")
    return dict(sorted(out.items()))


def fold_table(df: pd.DataFrame, class_names: list[str] | None = None) -> str:
    """Human-readable per-fold summary: images, groups, val images, class presence, mean size; a fold
    with a :func:`fold_problems` problem is marked ``!`` and explained below the table."""
    names = _class_columns(df, class_names)
    has_cols = list(names)
    problems = fold_problems(df, class_names)
    size_col = next((c for c in ("lv_myo_area", "fg_area") if c in df.columns), None)
    show_val = "split" in df.columns and (df["split"] != "train").any()
    header = ["fold", "images"] + (["groups"] if "group" in df.columns else []) + (["val"] if show_val else [])
    header += [names[c] for c in has_cols] + (["LV+Myo px" if size_col == "lv_myo_area" else "fg px"] if size_col else [])

    def row(label: str, part: pd.DataFrame) -> list[str]:
        cells = [label, str(len(part))]
        if "group" in df.columns:
            cells.append(str(part["group"].nunique()))
        if show_val:
            cells.append(str(int((part["split"] != "train").sum())))
        for c in has_cols:
            k = int(part[c].sum())
            cells.append(f"{k} ({k / max(len(part), 1):.0%})")
        if size_col:
            cells.append(f"{part[size_col].mean():.0f}")
        return cells

    rows = [header] + [row(f"{f}!" if f in problems else str(f), part) for f, part in df.groupby("fold", sort=True)]
    rows.append(row("all", df))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    return "\n".join(lines + [f"! fold {f}: {'; '.join(why)}" for f, why in problems.items()])


def write_folds(df: pd.DataFrame, path, force: bool = False) -> Path:
    """Write the folds CSV atomically; refuse to replace an existing file unless ``force``."""
    path = Path(path)
    if path.is_dir():
        raise KaggleCMRError(f"{path}: is a folder, expected a CSV file path")
    atomic_write_text(path, df.to_csv(index=False, lineterminator="\n"), overwrite=force)
    return path


def _few(items, k: int = 5) -> str:
    items = sorted(map(str, items), key=natural_key)
    return ", ".join(items[:k]) + (", ..." if len(items) > k else "")


def _int_column(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    """``df[col]`` as int64; a one-line DataError names the first empty or non-integer value."""
    values = pd.to_numeric(df[col], errors="coerce")
    bad = df[col][values.isna() | (values % 1 != 0)]
    if len(bad):
        raise DataError(f"{path}: column '{col}' must hold integers (row of id {df['id'][bad.index[0]]!r} "
                        f"has {bad.iloc[0]!r})")
    return values.astype(np.int64)


def _validate_folds(df: pd.DataFrame, path: Path) -> None:
    """Check columns, integer folds/groups, unique ids, folds 0..k-1 and unsplit groups (in place)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (expected id,fold,... from make-folds)")
    if df.empty:
        raise DataError(f"{path}: no rows")
    if df["id"].isna().any():
        raise DataError(f"{path}: column 'id' has empty values")
    for col in ("fold", "group"):
        if col in df.columns:
            df[col] = _int_column(df, col, path)
    dup = df["id"][df["id"].duplicated()].unique()
    if len(dup):
        raise DataError(f"{path}: duplicate ids {_few(dup)}")
    folds = set(df["fold"].tolist())
    k = max(folds) + 1
    if min(folds) < 0 or folds != set(range(k)) or k < 2:
        raise DataError(f"{path}: folds must be 0..k-1 with k >= 2 and none empty (found {sorted(folds)[:10]})")
    if "group" in df.columns:
        spread = df.groupby("group")["fold"].nunique()
        if (spread > 1).any():
            raise DataError(f"{path}: group {spread[spread > 1].index[0]} is split across folds (leakage)")


def read_folds(path, ids=None) -> pd.DataFrame:
    """Read and validate a folds CSV; with ``ids``, check it covers exactly those ids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: folds file not found (run `kagglecmr make-folds`)")
    try:
        df = pd.read_csv(path, dtype={"id": str, "split": str, "stratum": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable folds CSV ({reason})") from None
    _validate_folds(df, path)
    if ids is not None:
        want = set(map(str, ids))
        have = set(df["id"])
        missing, extra = want - have, have - want
        if missing or extra:
            parts = ([f"{len(missing)} image id(s) missing ({_few(missing)})"] if missing else []) + \
                    ([f"{len(extra)} id(s) not in the data ({_few(extra)})"] if extra else [])
            raise DataError(f"{path}: folds file does not match the data: {'; '.join(parts)} "
                            "(re-run make-folds --force)")
    return df


def _too_big_groups(names: list[str], n_folds: int) -> list[str]:
    """Regex groups no fold can hold (more than the mean fold + ``BALANCE_TOLERANCE``), largest first."""
    limit = (1 + BALANCE_TOLERANCE) * len(names) / n_folds
    sizes = pd.Series(names).value_counts()
    return [f"group {g!r} has {c} images, more than a fold may hold ({limit:.0f} = mean fold "
            f"{len(names) / n_folds:.1f} + {BALANCE_TOLERANCE:.0%})" for g, c in sizes[sizes > limit].items()]


def _what_to_do(by_regex: bool, groups: bool) -> str:
    if by_regex:
        fix = "make the dataset file's group regex name smaller groups, use --no-groups"
    elif groups:
        fix = "name the true groups with a group: regex in a dataset file, use --no-groups"
    else:
        fix = "use fewer --n-folds"
    return f"{fix}, or --allow-unbalanced to write them anyway"


def run_make_folds(data, n_folds: int = 5, seed: int = 42, out=Path("folds/folds.csv"), groups: bool = True,
                   force: bool = False, spec: DataSpec | None = None, config=None,
                   allow_unbalanced: bool = False) -> pd.DataFrame:
    """Load the labelled images of ``data`` (a folder or a dataset file), make folds, print a per-fold
    table and write ``out``.  Groups: the dataset's ``group`` regex, else the similarity guard.
    Unbalanced folds (:func:`fold_problems`) or a regex group larger than a fold may hold are a one-line
    error and nothing is written, unless ``allow_unbalanced`` (then a warning).
    ``config`` (or the legacy ``spec``) pins size/channels/classes as ``train`` would."""

    out = Path(out)
    if n_folds < 2:
        raise KaggleCMRError(f"--n-folds must be at least 2 (got {n_folds})")
    if out.exists() and not force:
        raise KaggleCMRError(f"{out}: already exists (use --force to overwrite)")
    ds = load_dataset(data)
    if config is None and spec is not None:
        config = Config(data=DataConfig(size=spec.size, in_channels=spec.in_channels, num_classes=spec.num_classes,
                                        resize=spec.resize))
    if config is not None:
        apply_dataset(config, ds)
    for note in ds.notes:
        print(note, flush=True)
    split = ds.labelled()
    by_regex = groups and ds.group is not None
    too_big = _too_big_groups(ds.groups(split.ids), n_folds) if by_regex else []
    if too_big and not allow_unbalanced:
        more = "; ..." if len(too_big) > 2 else ""
        raise KaggleCMRError(f"{ds.path}: {'; '.join(too_big[:2])}{more}; {_what_to_do(True, True)}")
    df = make_folds(split, n_folds=n_folds, seed=seed, groups=groups, num_classes=len(ds.label_names),
                    group_of=ds.groups if by_regex else None, multilabel=ds.multilabel)
    sizes = df["group"].value_counts()
    per_split = ", ".join(f"{s} {n}" for s, n in df["split"].value_counts(sort=False).items())
    if by_regex:
        grouping = f"groups: regex {ds.group!r} ({len(sizes)} groups, largest {sizes.max()} images)"
    elif groups:
        grouping = (f"groups: similarity guard ({len(sizes)} similarity groups, largest {sizes.max()} images, "
                    f"threshold {SIMILARITY_THRESHOLD})")
    else:
        grouping = "groups: none, no grouping (--no-groups)"
    print(f"make-folds: {len(df)} labelled images ({per_split}) -> {n_folds} folds, seed {seed}; {grouping}")
    cut = df.attrs.get("similarity_cut", [])
    if cut:
        shown = ", ".join(map(str, cut[:3])) + (", ..." if len(cut) > 3 else "")
        print(f"note: {len(cut)} set(s) of alike images ({shown} images) were cut into groups of at most "
              f"{similarity_cap(len(df), n_folds)} ({BALANCE_TOLERANCE:.0%} of a fold); their parts may leak across "
              "folds: if they share a source (a part, a patient, a video), name it with a group: regex")
    print(fold_table(df, ds.label_names))
    problems = [f"fold {f}: {', '.join(why)}" for f, why in fold_problems(df, ds.label_names).items()]
    if problems or too_big:
        what = "; ".join(too_big[:2] + problems[:3]) + ("; ..." if len(problems) > 3 else "")
        if not allow_unbalanced:
            biggest = f" (largest group {sizes.max()} images)" if groups else ""
            raise KaggleCMRError(f"{ds.path}: unbalanced folds{biggest}: {what}; {_what_to_do(by_regex, groups)}")
        print(f"warning: unbalanced folds, written anyway (--allow-unbalanced): {what}")
    write_folds(df, out, force=force)
    print(f"wrote {out}")
    return df
