"""Experiment configs: the schema, loading with ``--set`` overrides, and the shipped YAML recipes."""
