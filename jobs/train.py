"""`ray job submit` entrypoint for train. A Ray Train (TorchTrainer, DDP) classifier on alpha-mixed
real/synthetic batches streamed from parquet; re-submitting the same name and output resumes.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train.yaml [--FIELD VALUE ...]
"""

import sys

from ray_dafusion.cli import build_parser, connect_ray
from ray_dafusion.config import TrainConfig
from ray_dafusion.train import train


def main(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(["train", *argv]))
    config_path = args.pop("_config")
    args.pop("stage")
    cfg = TrainConfig.from_args(config_path, args)
    connect_ray()
    result = train(cfg)
    print(f"train ({result.method}, alpha {result.alpha}): run {result.output}, {result.epochs_completed} epochs "
          f"in {result.seconds:.1f}s")
    print(f"  best val mean per-class accuracy {result.best_val_mean_class_acc} at {result.best_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
