"""Distributed two-phase MobileNetV2 training with Ray Train: the driver (``driver``), the
per-worker loop (``loop``), the distribution strategy and its Ray Train backend (``strategy``,
``backend``), and the tf.data input (``tfdata``)."""
