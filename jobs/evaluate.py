"""`ray job submit` entrypoint for evaluate. Scores each run's best-on-val checkpoint on the test split
and writes results.json, results.md, confusion matrices and the accuracy-vs-shots plot.

    ray job submit --working-dir . -- python jobs/evaluate.py --real runs/demo/real \
        --runs runs/demo/train/baseline,runs/demo/train/da_fusion --output runs/demo/results
"""

import sys

from ray_dafusion.cli import build_parser, connect_ray
from ray_dafusion.config import EvaluateConfig
from ray_dafusion.evaluate import evaluate


def main(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(["evaluate", *argv]))
    config_path = args.pop("_config")
    args.pop("stage")
    cfg = EvaluateConfig.from_args(config_path, args)
    connect_ray()
    result = evaluate(cfg)
    print(f"evaluate ({result.split}): {len(result.runs)} runs -> {result.output}")
    for r in result.runs:
        print(f"  {r['name']}: {r['method']} shots {r['examples_per_class']} alpha {r['alpha']} "
              f"mean per-class acc {r['mean_class_acc']:.4f} top-1 {r['top1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
