"""Self-contained HTML reports (static HTML + PNG files, no network, no CDN) inspectors can look at:
one per model artifact (``training``) and one per scoring run (``scoring``), built with ``page``.
Both work on local paths and ``s3://`` URIs and read only what training and scoring wrote. Key
numbers carry stable element ids so tests (and scripts) can check them against their source."""
