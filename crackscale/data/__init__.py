"""Training data: the labelled image tree scanned, de-duplicated and split (``labelled``), and
synthetic concrete images for demos and tests (``synth``)."""
