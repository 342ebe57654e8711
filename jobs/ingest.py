"""`ray job submit` entrypoint for ingest. Labelled images -> real/{train,val,test} parquet shards.

    ray job submit --working-dir . -- python jobs/ingest.py --config jobs/configs/ingest.yaml [--FIELD VALUE ...]

Exit codes: 0 done, 1 the stage failed (one line on stderr says what to do), 2 bad config.
"""

import sys

from ray_dafusion.cli import run_job


def summary(result) -> str:
    return (f"ingest: output {result.output}: {result.counts} images, {result.errors} quarantined, "
            f"classes {result.classes}")


def main(argv: list[str]) -> int:
    return run_job("ingest", argv, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
