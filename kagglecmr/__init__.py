"""kagglecmr: k-fold segmentation ensembles for Kaggle-style 2D segmentation competitions.

``import kagglecmr as kc`` gives the CLI's verbs as plain functions (:mod:`kagglecmr.api`): ``kc.demo_data``,
``kc.make_folds``, ``kc.train``, ``kc.ensemble``, ``kc.score``, ``kc.encode``, ``kc.predict``, ``kc.export``,
``kc.load_ensemble``, ``kc.load_export``, ``kc.pseudo_label``, ``kc.runs``, ``kc.report``.  They are looked up
on first use (module ``__getattr__``), so importing the package does not import torch.

The package is layered; each subpackage imports only those below it (checked by ``lint-imports``):
``cli`` → ``api`` → ``reports`` → ``engine`` → ``models`` → ``data`` → ``cfg`` → ``formats`` → ``utils``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = ("demo_data", "make_folds", "score", "encode", "train", "ensemble", "load_ensemble", "predict", "export",
        "load_export", "pseudo_label", "runs", "report", "set_cache_dir")
__all__ = [*_API, "KaggleCMRError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("kagglecmr.api"), name)
    if name == "KaggleCMRError":
        return importlib.import_module("kagglecmr.utils.errors").KaggleCMRError
    raise AttributeError(f"module 'kagglecmr' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
