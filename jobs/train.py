"""Train a crack classifier on the connected Ray cluster (same as `crackscale train`).

ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train.yaml
python jobs/train.py --config jobs/configs/demo.yaml --set num_workers=2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout / working_dir

from crackscale import cli  # noqa: E402

if __name__ == "__main__":
    cli.exit_process(cli.job_main("train"))
