"""Search training hyperparameters (and, with PBT, a learning-rate schedule) with Ray Tune
(same as `crackscale tune`).

    RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 \
        ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune.yaml
    python jobs/tune.py --config jobs/configs/tune.yaml --set scheduler=pbt --set num_samples=4
    python jobs/tune.py --config jobs/configs/tune.yaml --resume --set name=tune-20260101-120000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout / working_dir

from crackscale import cli  # noqa: E402

if __name__ == "__main__":
    cli.exit_process(cli.job_main("tune"))
