"""`ray job submit` entrypoint for gallery. A PNG contact sheet of an augment output: each real image
beside its augmentations, captioned with t0 (files only: no Ray work).

    ray job submit --working-dir . -- python jobs/gallery.py s3://my-bucket/runs/x/synthetic/da_fusion [--FIELD VALUE ...]

On a cluster give s3:// URIs: a local path names the disk of the node the driver runs on.

Exit codes: 0 done, 1 the stage failed (one line on stderr says what to do), 2 bad config.
"""

import sys

from ray_dafusion.cli import run_job


def summary(result) -> str:
    return (f"gallery: {result.output}: {result.sources} real images with {result.augmentations} augmentations "
            f"({result.width}x{result.height} px)")


def main(argv: list[str]) -> int:
    return run_job("gallery", argv, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
