"""`ray job submit` entrypoint for score. Quality scores per synthetic image (classifier, distance to
the source, CLIP text agreement), stored beside the augment output for train-time filters.

    ray job submit --working-dir . -- python jobs/score.py --config jobs/configs/score.yaml [--FIELD VALUE ...]

On a cluster of several machines give s3:// URIs in place of the config's local paths (--synthetic,
--run): a local path lands on each node's own disk.

Exit codes: 0 done, 1 the stage failed (one line on stderr says what to do), 2 bad config.
"""

import sys

from ray_dafusion.cli import run_job


def summary(result) -> str:
    lines = [f"score: {result.synthetic} ({result.seconds:.1f}s)"]
    lines += [f"  {scorer}: {result.scored.get(scorer, 0)} scored now -> {uri}" for scorer, uri in result.scores.items()]
    lines += [f"  {scorer}: skipped ({why})" for scorer, why in result.skipped.items() if scorer not in result.scores]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    return run_job("score", argv, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
