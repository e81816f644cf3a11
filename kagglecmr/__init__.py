"""kagglecmr: k-fold segmentation ensembles for Kaggle-style PNG competitions."""

__version__ = "0.1.0"
