"""Measure a model artifact on labelled sources, source by source (same as `crackscale evaluate`).

python jobs/evaluate.py --model runs/field/model --data ../shared/data/field/cfd --data s3://bucket/site-b/
python jobs/evaluate.py --model runs/field/model --data ../shared/data/concrete-crack --split test
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout / working_dir

from crackscale import cli  # noqa: E402

if __name__ == "__main__":
    cli.exit_process(cli.job_main("evaluate"))
