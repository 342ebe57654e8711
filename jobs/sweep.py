"""`ray job submit` entrypoint for sweep. The paper's experiment on Ray Tune: shots x seeds x methods,
each stage output made once and reused; a re-run skips finished trials.

    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sweep_digits.yaml [--FIELD VALUE ...]

On a cluster of several machines give s3:// URIs in place of the config's local paths (--workdir): a
local path lands on each node's own disk.

Exit codes: 0 done, 1 the stage failed (one line on stderr says what to do), 2 bad config.
"""

import sys

from ray_dafusion.cli import run_job


def summary(result) -> str:
    lines = [f"sweep: {result.trials} trials ({result.ran} run now) in {result.seconds:.0f}s; {result.files[0]}"]
    for row in result.summary:
        ci = row["ci95"] * 100 if row["ci95"] == row["ci95"] else float("nan")
        lines.append(f"  {row['method']:>13} k={row['shots']}: {100 * row['mean']:.1f} +- {ci:.1f} (n={row['n']})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    return run_job("sweep", argv, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
