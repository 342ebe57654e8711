"""`ray job submit` entrypoint for pipeline. Every stage in order under one workdir; complete outputs are skipped, so a re-run resumes.

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/pipeline.yaml [--SECTION.FIELD VALUE ...]

Exit codes: 0 done, 1 the stage failed (one line on stderr says what to do), 2 bad config.
"""

import json
import sys

from ray_dafusion.cli import run_job


def summary(result) -> str:
    return json.dumps(result.outputs, indent=2)


def main(argv: list[str]) -> int:
    return run_job("pipeline", argv, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
