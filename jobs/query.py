"""Query scoring outputs with DuckDB (same as `crackscale query`).

python jobs/query.py top --output s3://bucket/scores/ --n 20 --prefix s3://bucket/images/site-a/
python jobs/query.py --output demo/scores --sql "SELECT run_date, count(*) FROM scores GROUP BY 1"
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout / working_dir

from crackscale import cli  # noqa: E402

if __name__ == "__main__":
    cli.exit_process(cli.job_main("query"))
