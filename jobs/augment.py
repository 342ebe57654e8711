"""`ray job submit` entrypoint for augment. M img2img augmentations per real image on a Ray Data actor pool.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/augment.py --config jobs/configs/augment.yaml [--FIELD VALUE ...]

On a cluster of several machines give s3:// URIs in place of the config's local paths (--real,
--embeddings, --output): a local path lands on each node's own disk.

Exit codes: 0 done, 1 the stage failed (one line on stderr says what to do), 2 bad config.
"""

import sys

from ray_dafusion.cli import run_job


def summary(result) -> str:
    return (f"augment: output {result.output}: {result.synthetic_rows} synthetic rows "
            f"({result.generated} new, {result.skipped_as_done} already done), "
            f"{result.errors} real rows quarantined, {result.images_per_second:.2f} images/s "
            f"over {result.wall_seconds:.1f}s")


def main(argv: list[str]) -> int:
    return run_job("augment", argv, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
