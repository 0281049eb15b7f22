"""crackscale: distributed MobileNetV2 crack detection on Ray (train, tune, score, query)."""

__version__ = "0.1.0"
