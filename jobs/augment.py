"""Augment stage for `ray job submit`:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/augment.py --config jobs/configs/augment.yaml [--FIELD VALUE ...]
"""

from __future__ import annotations

import argparse
import sys

from ray_dafusion.augment import augment
from ray_dafusion.cli import connect_ray
from ray_dafusion.config import AugmentConfig, ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=AugmentConfig.__doc__)
    parser.add_argument("--config", default=None, help="YAML file of AugmentConfig fields")
    args, rest = parser.parse_known_args(argv)
    if len(rest) % 2 or not all(k.startswith("--") for k in rest[::2]):
        parser.error(f"overrides must be --FIELD VALUE pairs, got {rest}")
    try:
        cfg = AugmentConfig.from_args(args.config, {k[2:]: v for k, v in zip(rest[::2], rest[1::2])})
    except ConfigError as exc:
        parser.error(str(exc))
    connect_ray()
    result = augment(cfg)
    print(f"augment: {result.synthetic_rows} synthetic rows ({result.generated} new, {result.skipped_as_done} "
          f"already done, {result.errors} real rows quarantined) in {result.output}; "
          f"{result.images_per_second:.2f} images/s over {result.wall_seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
