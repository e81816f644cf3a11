"""Natural sort order of image ids: ``cmr2`` before ``cmr10``."""

from __future__ import annotations

import re


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically: cmr2 < cmr10."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", str(text))]


def natural_sorted(items, key=lambda x: x):
    return sorted(items, key=lambda x: natural_key(key(x)))
