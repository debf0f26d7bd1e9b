"""Shared code of the Plateau app: run config, datasets, models and the DP mechanism."""

__version__ = "0.1.0"
