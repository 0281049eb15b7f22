"""Model runtimes for scoring: tf.keras (GPU or CPU) and LiteRT/XNNPACK (CPU). Each takes a batch of
RGB images of the artifact's ``image_size`` (uint8 or float32, 0..255) and returns P(crack) as
float32 of shape (N,)."""
