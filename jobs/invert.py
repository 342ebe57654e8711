"""`ray job submit` entrypoint for invert. Textual inversion as a Ray job: one task per class learns its token.

    ray job submit --working-dir . -- python jobs/invert.py --config jobs/configs/invert.yaml [--FIELD VALUE ...]

On a cluster of several machines give s3:// URIs in place of the config's local paths (--real,
--output): a local path lands on each node's own disk.

Exit codes: 0 done, 1 the stage failed (one line on stderr says what to do), 2 bad config.
"""

import sys

from ray_dafusion.cli import run_job


def summary(result) -> str:
    lines = [f"invert: tokens {result.embeddings} ({result.num_classes} classes; "
             f"{len(result.trained)} learned, {len(result.skipped)} already done) in {result.seconds:.1f}s"]
    lines += [f"  {name}: {seconds:.1f}s" for name, seconds in result.seconds_per_class.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    return run_job("invert", argv, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
