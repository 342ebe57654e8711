"""`ray job submit` entrypoint for erase. ESD concept erasure as a Ray job: one task per class name edits the UNet.

    ray job submit --working-dir . -- python jobs/erase.py --config jobs/configs/erase.yaml [--FIELD VALUE ...]
"""

import sys

from ray_dafusion.cli import build_parser, connect_ray
from ray_dafusion.config import EraseConfig
from ray_dafusion.erasure import erase


def main(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(["erase", *argv]))
    config_path = args.pop("_config")
    args.pop("stage")
    cfg = EraseConfig.from_args(config_path, args)
    connect_ray()
    result = erase(cfg)
    print(f"erase ({result.method}): output {result.output} ({result.num_classes} classes; "
          f"{len(result.trained)} erased, {len(result.skipped)} already done) in {result.seconds:.1f}s")
    for name, seconds in result.seconds_per_class.items():
        print(f"  {name}: {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
