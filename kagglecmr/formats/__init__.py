"""The competition's file formats and metric: run-length codec, submission format, Dice tables, submission CSVs (pure numpy, no torch)."""
