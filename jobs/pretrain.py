"""`ray job submit` entrypoint for pretrain. Trains a small text-conditional diffusion pipeline on
unlabelled images (autoencoder, then UNet and text encoder) with Ray Train; `model` then loads it.

    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain_digits.yaml [--FIELD VALUE ...]

On a cluster of several machines give s3:// URIs in place of the config's local paths (--source,
--output): a local path lands on each node's own disk.

Exit codes: 0 done, 1 the stage failed (one line on stderr says what to do), 2 bad config.
"""

import sys

from ray_dafusion.cli import run_job


def summary(result) -> str:
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    return (f"pretrain: pipeline {result.output} from {result.num_images} images, {len(result.words)} caption words, "
            f"{result.vae_steps} autoencoder + {result.steps} denoiser steps, final loss {loss}, {result.seconds:.0f}s")


def main(argv: list[str]) -> int:
    return run_job("pretrain", argv, summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
