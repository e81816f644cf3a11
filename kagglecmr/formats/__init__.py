"""The competition's file formats and metric: run-length codec, submission format, the competition metrics, submission CSVs (pure numpy, no torch)."""
