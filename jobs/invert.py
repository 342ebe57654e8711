"""`ray job submit` entrypoint for invert. Textual inversion as a Ray job: one task per class learns that class's token.

    ray job submit --working-dir . -- python jobs/invert.py --config jobs/configs/invert.yaml [--FIELD VALUE ...]
"""

import sys

from ray_dafusion.cli import build_parser, connect_ray
from ray_dafusion.config import InvertConfig
from ray_dafusion.inversion import invert


def main(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(["invert", *argv]))
    config_path = args.pop("_config")
    args.pop("stage")
    cfg = InvertConfig.from_args(config_path, args)
    connect_ray()
    result = invert(cfg)
    print(f"invert: tokens {result.embeddings} ({result.num_classes} classes; "
          f"{len(result.trained)} learned, {len(result.skipped)} already done) in {result.seconds:.1f}s")
    for name, seconds in result.seconds_per_class.items():
        print(f"  {name}: {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
