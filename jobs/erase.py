"""`ray job submit` entrypoint for erase. ESD concept erasure as a Ray job: one task per class name edits the UNet.

    ray job submit --working-dir . -- python jobs/erase.py --config jobs/configs/erase.yaml [--FIELD VALUE ...]

On a cluster of several machines give s3:// URIs in place of the config's local paths (--real,
--output): a local path lands on each node's own disk.

Exit codes: 0 done, 1 the stage failed (one line on stderr says what to do), 2 bad config.
"""

import sys

from ray_dafusion.cli import run_job


def summary(result) -> str:
    lines = [f"erase ({result.method}): output {result.output} ({result.num_classes} classes; "
             f"{len(result.trained)} erased, {len(result.skipped)} already done) in {result.seconds:.1f}s"]
    lines += [f"  {name}: {seconds:.1f}s" for name, seconds in result.seconds_per_class.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    return run_job("erase", argv, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
