"""Image bytes → model input: header checks, the TensorFlow-free JPEG decoder and its resize kernel,
and the TensorFlow decode that training uses (and scoring falls back to)."""
