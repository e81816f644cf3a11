"""Models: the segmentation-model factory, losses and checkpoint files."""
