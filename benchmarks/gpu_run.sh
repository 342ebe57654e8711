#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, on a lent GPU machine with no Ray and no network.
# Build the bundle here first (python benchmarks/gpu_bundle.py build), then there, carrying .gpu:
#   bash benchmarks/gpu_run.sh generate   # generation through the Ray job, ~6 min; with
#                                         # `--configs fast,compiled --num-real 24` 310 s on an H200
#   bash benchmarks/gpu_run.sh profile    # one actor call: UNet / VAE / rest shares, top kernels, ~2 min
#   bash benchmarks/gpu_run.sh train      # rows/s the CPUs decode, training stream vs preloaded,
#                                         # then train/evaluate/score lines, ~5 min (STAGES=0: without
#                                         # those lines, ~3 min)
# Figures and logs go to $OUT (the device tool's folder that comes back), else /tmp/gpu-out.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_DATA_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1
WORK=/tmp/gpu-ray-job  # real sets and tokens (inputs) are reused; each call measures into its own $WORK/run-<time>/
if ! PYTHONPATH=/tmp/site python3 -c "import ray, diffusers" 2>/dev/null; then  # installed by an earlier call
  python3 benchmarks/gpu_bundle.py install --target /tmp/site || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
case "${1:-generate}" in
  generate)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 benchmarks/gpu_smoke.py 2>&1 | grep -v "^\s*$" | tail -4
    python3 benchmarks/gpu_ray_job.py --workdir $WORK --out "$OUT/gpu_ray_job.json" "${@:2}" > "$OUT/gpu_ray_job.log" 2>&1
    echo "gpu_ray_job rc $?"; grep -E "^(eager|fast|compiled): |TFLOP/s|^failed: " "$OUT/gpu_ray_job.log"
    ;;
  profile)
    python3 benchmarks/gpu_profile.py --trace --out "$OUT/gpu_profile.json" "${@:2}" > "$OUT/gpu_profile.log" 2>&1
    echo "gpu_profile rc $?"; grep -E "^one call|% of the wall|UNet:|kernels:" "$OUT/gpu_profile.log"
    ;;
  train)
    # threads in the training process (8: their best on an H100) against Ray tasks (decode_processes)
    python3 benchmarks/decode_rate.py --threads 8 --processes 6,12 --repeats 3 --image-size 224 --source-size 160 \
      --out "$OUT/decode_rate.json" 2>&1 | grep -E "rows/s|finish on GPU|Error"
    # the worker keeps 2 CPUs for the step, 6 Ray tasks decode, 8 CPUs stay for Ray Data's reads and
    # the processes around them (on the H200's 16 CPUs, 12 tasks starved the reads: ratio 0.34 vs 0.70);
    # 150 timed steps: 40 (~1 s) moved the preloaded rate by 25% between two calls
    python3 benchmarks/train_overhead.py --use-gpu --arch resnet50 --image-size 224 --source-size 160 \
      --batch-size 64 --steps 150 --warmup 5 --m 2 --cpus-per-worker 2 --decode-processes 6 --out "$OUT/train_gpu.json" > "$OUT/train_gpu.log" 2>&1
    echo "train_overhead rc $?"; grep -E "samples/s|ratio" "$OUT/train_gpu.log" | grep -v INFO | tail -4
    # the stages train on the synthetic rows of the latest generate call (and the real set they were
    # made from, whatever its --num-real/--size); on a fresh machine, make a few. STAGES=0: skip them
    [ "${STAGES:-1}" = 0 ] && exit 0
    configs=(--configs "")
    [ -f $WORK/latest.json ] || configs=(--configs fast --num-real 8 --m 2 --steps 10)
    python3 benchmarks/gpu_ray_job.py --workdir $WORK "${configs[@]}" --stages --train-steps 10 \
      --out "$OUT/gpu_stages.json" > "$OUT/gpu_stages.log" 2>&1
    echo "stages rc $?"; grep -E "on GPU( \([^)]*\))?: |StaleResult" "$OUT/gpu_stages.log"
    ;;
esac
