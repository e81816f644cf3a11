"""kagglecmr: k-fold segmentation ensembles for Kaggle-style PNG competitions.

``import kagglecmr as kc`` gives the CLI's verbs as functions (:mod:`kagglecmr.api`): ``kc.demo_data``,
``kc.make_folds``, ``kc.train``, ``kc.ensemble``, ``kc.score``, ``kc.encode``, ``kc.predict``, ``kc.export``,
``kc.load_ensemble``, ``kc.load_export``, ``kc.pseudo_label``.  They are imported on first use, so importing the package
does not import torch.

Four verbs share their name with a module (``kagglecmr.train``, ``.ensemble``, ``.score``, ``.export``):
those modules are made callable, so ``kc.train(...)`` runs :func:`kagglecmr.api.train` while
``from kagglecmr import ensemble; ensemble.load_run(...)`` keeps working.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_API = ("demo_data", "make_folds", "score", "encode", "train", "ensemble", "load_ensemble", "predict", "export",
        "load_export", "pseudo_label")
_VERB_MODULES = ("train", "ensemble", "score", "export")  # modules of these names double as the API verb
__all__ = [*_API, "KaggleCMRError", "__version__"]


class _VerbModule(types.ModuleType):
    """A submodule that, called, runs the API function of the same name."""

    def _verb(self):
        from . import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])

    def __call__(self, *args, **kwargs):
        return self._verb()(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(self._verb())


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _VERB_MODULES and isinstance(value, types.ModuleType) and type(value) is types.ModuleType:
            value.__class__ = _VerbModule  # the import system binds submodules here
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _VERB_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "KaggleCMRError":
        from .errors import KaggleCMRError

        return KaggleCMRError
    raise AttributeError(f"module 'kagglecmr' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
