"""Query scoring outputs with DuckDB (same as `crackscale query`).

    python jobs/query.py top --output s3://bucket/scores/ --n 20 --prefix s3://bucket/images/site-a/
    python jobs/query.py --output demo/scores --sql "SELECT run_date, count(*) FROM scores GROUP BY 1"
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout / working_dir

from crackscale import cli, query  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(prog="jobs/query.py", description=__doc__.splitlines()[0])
    args = query.add_arguments(p).parse_args()
    cli.setup_logging()
    return cli.run_guarded(query.cmd_query, args)


if __name__ == "__main__":
    sys.exit(main())
