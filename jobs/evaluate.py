"""`ray job submit` entrypoint for evaluate. Scores each run's best-on-val checkpoint on the
test split and writes results.json, results.md, confusion matrices and the accuracy-vs-shots plot.

    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/evaluate.yaml [--FIELD VALUE ...]

On a cluster of several machines give s3:// URIs in place of the config's local paths (--real,
--runs, --output): a local path lands on each node's own disk.

Exit codes: 0 done, 1 the stage failed (one line on stderr says what to do), 2 bad config.
"""

import sys

from ray_dafusion.cli import run_job


def summary(result) -> str:
    lines = [f"evaluate ({result.split}): {len(result.runs)} runs -> {result.output}"]
    lines += [f"  {r['name']}: {r['method']} shots {r['examples_per_class']} alpha {r['alpha']} "
              f"mean per-class acc {r['mean_class_acc']:.4f} top-1 {r['top1']:.4f}" for r in result.runs]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    return run_job("evaluate", argv, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
