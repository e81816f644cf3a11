"""Context channels (``data.context``): what the model sees beside each image.

``partner``: cardiac MR slices come in near-duplicate pairs (two frames of one slice, the pairs
``make-folds`` groups with :func:`kagglecmr.data.folds.similarity_groups`).  The partner frame is the other
image most similar to it (:func:`kagglecmr.data.folds.image_similarity` at least
:data:`~kagglecmr.data.folds.SIMILARITY_THRESHOLD`), found the same way within any split (labelled images
among themselves, test images among themselves); an image without one gets itself.  The partner's
channels follow the image's, so the model takes ``2 * data.in_channels`` channels.

Partners are always in the same fold (make-folds keeps similarity groups together), so no held-out
image leaks into a fold's training through its partner.  Pure numpy (no torch import).
"""

from __future__ import annotations

import numpy as np

from kagglecmr.data.folds import SIMILARITY_THRESHOLD, image_similarity

CONTEXTS = ("none", "partner")


def partners(images: np.ndarray) -> np.ndarray:
    """Index of each image's partner frame (itself when no other image is similar enough)."""

    n = len(images)
    if n < 2:
        return np.arange(n)
    sim = image_similarity(images)
    np.fill_diagonal(sim, -np.inf)
    best = sim.argmax(1)
    return np.where(sim[np.arange(n), best] >= SIMILARITY_THRESHOLD, best, np.arange(n))


def add_context(images: np.ndarray, context: str) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` -> ``[N, H, W, C * channels_factor(context)]`` (the images themselves
    for ``none``)."""
    if context == "none":
        return images
    if context == "partner":
        return np.concatenate([images, images[partners(images)]], axis=-1)
    raise ValueError(f"unknown context {context!r}")


def channels_factor(context: str) -> int:
    return 2 if context == "partner" else 1
