"""`ray job submit` entrypoint for report. One table of every stage output under a workdir: time,
work, device-seconds, cost, links (files only: no Ray work).

    ray job submit --working-dir . -- python jobs/report.py s3://my-bucket/runs/x [--FIELD VALUE ...]

On a cluster give s3:// URIs: a local path names the disk of the node the driver runs on.

Exit codes: 0 done, 1 the stage failed (one line on stderr says what to do), 2 bad config.
"""

import sys

from ray_dafusion.cli import run_job


def summary(result) -> str:
    return f"{result.table}report: {len(result.rows)} stage outputs -> {result.output}"


def main(argv: list[str]) -> int:
    return run_job("report", argv, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
