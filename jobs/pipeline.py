"""`ray job submit` entrypoint for the whole pipeline.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --config jobs/configs/pipeline.yaml [--augment.num_augmentations 5 ...]

Joins the cluster the job runs on (RAY_ADDRESS, set by `ray job submit`), runs ingest -> invert ->
(erase) -> augment -> train -> evaluate under `workdir`, and prints where everything went.
"""

import json
import sys

from ray_dafusion.cli import build_parser, connect_ray
from ray_dafusion.config import PipelineConfig
from ray_dafusion.pipeline import pipeline


def main(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(["pipeline", *argv]))
    config_path = args.pop("_config")
    args.pop("stage")
    cfg = PipelineConfig.from_args(config_path, args)
    connect_ray()
    result = pipeline(cfg)
    print(json.dumps(result.outputs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
