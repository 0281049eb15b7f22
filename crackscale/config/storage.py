"""Where S3-compatible storage lives: the ``storage:`` section of every config."""

from __future__ import annotations

import dataclasses

from crackscale.config.loader import setting


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """Where S3-compatible storage lives. Empty values fall back to the standard AWS variables.

    Keys: docs/configuration.md, "StorageConfig".
    """

    s3_endpoint: str = setting(
        "",
        help=(
            'S3-compatible endpoint URL, e.g. http://127.0.0.1:9000 for MinIO or Ceph; "" = AWS_ENDPOINT_URL_S3 or '
            "AWS_ENDPOINT_URL, else AWS itself. Credentials come from the standard AWS chain, never from configs"
        ),
    )
    s3_region: str = setting("", help='S3 region; "" = AWS_REGION or AWS_DEFAULT_REGION, else us-east-1')
