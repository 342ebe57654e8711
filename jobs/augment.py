"""`ray job submit` entrypoint for augment.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/augment.py --config jobs/configs/augment.yaml [--FIELD VALUE ...]
"""

import sys

from ray_dafusion.augment import augment
from ray_dafusion.cli import build_parser, connect_ray
from ray_dafusion.config import AugmentConfig


def main(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(["augment", *argv]))
    config_path = args.pop("_config")
    args.pop("stage")
    cfg = AugmentConfig.from_args(config_path, args)
    connect_ray()
    result = augment(cfg)
    print(
        f"augment: output {result.output}: {result.synthetic_rows} synthetic rows "
        f"({result.generated} new, {result.skipped_as_done} already done), "
        f"{result.errors} real rows quarantined, {result.images_per_second:.2f} images/s "
        f"over {result.wall_seconds:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
