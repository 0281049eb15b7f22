"""Nightly batch scoring with Ray Data: images in storage → exactly-once Parquet, one row per
(image, model). ``run.run`` is the entry point; docs/scoring.md describes the pipeline and the
commit protocol."""
