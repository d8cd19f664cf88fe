"""gpas-megatron: GPAS and its normalization baselines on Megatron-Core."""

__version__ = "0.1.0"
