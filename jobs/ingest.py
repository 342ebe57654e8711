"""`ray job submit` entrypoint for ingest.

    ray job submit --working-dir . -- python jobs/ingest.py --config jobs/configs/ingest.yaml
"""

import sys

from ray_dafusion.cli import build_parser, connect_ray
from ray_dafusion.config import IngestConfig
from ray_dafusion.ingest import ingest


def main(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(["ingest", *argv]))
    config_path = args.pop("_config")
    args.pop("stage")
    cfg = IngestConfig.from_args(config_path, args)
    connect_ray()
    result = ingest(cfg)
    print(f"ingest: output {result.output}: {result.counts} images, {result.errors} quarantined, classes {result.classes}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
