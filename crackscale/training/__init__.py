"""Distributed two-phase MobileNetV2 training with Ray Train: the driver (``driver``), the
per-worker loop (``loop``) with its callbacks (``callbacks``), input (``inputs``, ``tfdata``,
``raydata``) and quality measures (``quality``), the distribution strategy and its Ray Train
backend (``strategy``, ``backend``), and exports added to an existing artifact (``export``)."""
