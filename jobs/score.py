"""Score every not-yet-scored image under a prefix (or in a manifest) into Parquet, exactly once
(same as `crackscale score`).

    RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 \
        ray job submit --working-dir . -- python jobs/score.py \
        --model s3://bucket/models/v3 --input s3://bucket/images/ --output s3://bucket/scores/
    python jobs/score.py --config jobs/configs/score.yaml --set input=demo/data --set output=demo/scores
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout / working_dir

from crackscale import cli  # noqa: E402

if __name__ == "__main__":
    cli.exit_process(cli.job_main("score"))
