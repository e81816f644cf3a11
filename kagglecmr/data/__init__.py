"""The data layer: dataset loading (folders, dataset files, mask values, labels CSVs), folds, context channels, augmentation, batches, synthetic demo data."""
