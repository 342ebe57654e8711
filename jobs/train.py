"""`ray job submit` entrypoint for train. Ray Train classifier on alpha-mixed real/synthetic batches.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train.yaml [--FIELD VALUE ...]

On a cluster of several machines give s3:// URIs in place of the config's local paths (--real,
--synthetic, --output): a local path lands on each node's own disk.

Exit codes: 0 done, 1 the stage failed (one line on stderr says what to do), 2 bad config.
"""

import sys

from ray_dafusion.cli import run_job


def summary(result) -> str:
    return (f"train ({result.method}, alpha {result.alpha}): run {result.output}, {result.epochs_completed} epochs "
            f"in {result.seconds:.1f}s\n  best val mean per-class accuracy {result.best_val_mean_class_acc} "
            f"at {result.best_checkpoint}")


def main(argv: list[str]) -> int:
    return run_job("train", argv, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
