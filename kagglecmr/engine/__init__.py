"""The engine: run folders, the fold trainer and its orchestration, inference with TTA, the ensembler, blending, postprocessing, prediction, export, pseudo-labels, scoring commands."""
