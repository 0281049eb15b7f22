"""Train a crack classifier on the connected Ray cluster.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train.yaml
    python jobs/train.py --config jobs/configs/demo.yaml --set num_workers=2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout / working_dir

from crackscale import cli  # noqa: E402


def main() -> int:
    args = cli.train_parser().parse_args()
    cli.setup_logging()
    return cli.run_guarded(cli.cmd_train, args)


if __name__ == "__main__":
    sys.exit(main())
