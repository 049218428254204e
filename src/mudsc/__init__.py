"""mudsc: merge separately trained networks without training (MuDSC and its baselines)."""

__version__ = "0.1.0"
