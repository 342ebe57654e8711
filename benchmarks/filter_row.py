"""One sweep row with and without a quality filter, on a finished sweep's outputs.

For each seed at the given shot count: the sweep's da_fusion synthetic set is scored (classifier
scorer: the same seed's baseline run, as ALIA; source_distance), then da_fusion is trained again
with `synthetic_filter` and exactly the sweep's other settings, and every run (the sweep's
unfiltered da_fusion runs and the filtered ones) is scored on the pool's test split in one
evaluate. Score and evaluate take the sweep's `score` and `evaluate` sections and its shared
settings (endpoint, overwrite, stall times, prices), as the sweep builds them. Nothing is
regenerated: the filter only chooses among stored images.

    .venv/bin/python benchmarks/filter_row.py --config jobs/configs/sweep_digits.yaml \\
        --workdir runs/sweep-digits --shots 1 --filter "classifier.top1_is_label == 1"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the sweep's config")
    parser.add_argument("--workdir", required=True, help="the finished sweep's workdir")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--seeds", default=None, help="comma-separated (default: the config's)")
    parser.add_argument("--filter", default="classifier.top1_is_label == 1")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()

    import ray

    from ray_dafusion import storage
    from ray_dafusion.config import SweepConfig
    from ray_dafusion.configlib import shared_settings
    from ray_dafusion.evaluate import evaluate
    from ray_dafusion.score import score
    from ray_dafusion.sweep import SUMMARY_JSON, Trial, _interval, _paths, _stage_configs
    from ray_dafusion.train import train

    cfg = SweepConfig.from_yaml(args.config).replace(workdir=args.workdir)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(cfg.seeds)
    ep = cfg.endpoint_url
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    out_root = storage.join(args.workdir, "filtered")
    started = time.time()
    plain, filtered, kept = {}, {}, {}
    for seed in seeds:
        trial, base = Trial("da_fusion", args.shots, seed), Trial("baseline", args.shots, seed)
        record = storage.read_json(_paths(cfg, trial)["record"], ep)
        baseline_run = storage.read_json(_paths(cfg, base)["record"], ep)["run"]
        synthetic = _paths(cfg, trial)["synthetic"]
        # the sweep's score section and its shared settings (endpoint, overwrite, stall times, prices), as sweep.py
        score(dataclasses.replace(cfg.score, synthetic=synthetic, run=baseline_run,
                                  scorers=["classifier", "source_distance"], **shared_settings(cfg, cfg.score)))
        train_cfg = dataclasses.replace(_stage_configs(cfg, trial)["train"], synthetic_filter=args.filter,
                                        output=storage.join(out_root, "train"), name=f"{trial.name}-filtered")
        result = train(train_cfg)
        plain[seed], filtered[seed] = record["run"], result.output
        report = json.loads(storage.read_bytes(storage.join(result.output, "train_result.json"), ep))
        kept[seed] = report.get("synthetic_filter", {})
    scored = evaluate(dataclasses.replace(cfg.evaluate, **{**shared_settings(cfg, cfg.evaluate), "overwrite": True},
                                          real=_paths(cfg, Trial("baseline", args.shots, seeds[0]))["pool"],
                                          runs=list(plain.values()) + list(filtered.values()),
                                          output=storage.join(out_root, f"results-k{args.shots}")))
    acc = {r["run"]: 100 * r["mean_class_acc"] for r in scored.runs}
    a = [acc[plain[s]] for s in seeds]
    b = [acc[filtered[s]] for s in seeds]
    diff = [y - x for x, y in zip(a, b)]
    (ma, ha), (mb, hb), (md, hd) = _interval(a), _interval(b), _interval(diff)
    kept_fraction = [k.get("kept", 0) / max(k.get("kept", 0) + k.get("dropped", 0), 1) for k in kept.values()]
    print("\n| method | shots | seeds | test mean per-class accuracy (%) | synthetic images kept |\n|---|---|---|---|---|")
    print(f"| da_fusion | {args.shots} | {len(seeds)} | {ma:.1f} ± {ha:.1f} | all |")
    print(f"| da_fusion, filter `{args.filter}` | {args.shots} | {len(seeds)} | {mb:.1f} ± {hb:.1f} | "
          f"{100 * sum(kept_fraction) / len(kept_fraction):.0f}% |")
    print(f"\nfiltered - unfiltered, paired by seed: {md:+.1f} ± {hd:.1f} points "
          f"({sum(d > 0 for d in diff)}/{len(diff)} better); {time.time() - started:.0f}s")
    # against the sweep's own standard runs (the comparison), when its summary is there
    summary_uri = storage.join(args.workdir, SUMMARY_JSON)
    if storage.exists(summary_uri, ep):
        standard = {r["seed"]: 100 * r["mean_class_acc"] for r in storage.read_json(summary_uri, ep)["runs"]
                    if r["method"] == "standard" and r["shots"] == args.shots}
        for label, values in (("unfiltered", a), ("filtered", b)):
            paired = [v - standard[s] for s, v in zip(seeds, values) if s in standard]
            if paired:
                m, h = _interval(paired)
                print(f"{label} - standard, paired by seed: {m:+.1f} ± {h:.1f} points "
                      f"({sum(d > 0 for d in paired)}/{len(paired)} better)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"seeds": seeds, "unfiltered": a, "filtered": b, "kept": kept, "filter": args.filter}, f, indent=1)


if __name__ == "__main__":
    main()
