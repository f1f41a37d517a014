#!/usr/bin/env bash
# The benchmark again with 3 rounds per recipe (the GPU host's launch overhead is noisy), and
# a check that two identical fp16 runs on CUDA give the same losses (cuDNN and embedding
# backward use atomics, so they need not).
#   bash benchmarks/gpu_rounds.sh DATA_DIR OUT_DIR     (from the repository root)
set -u
[ -f main.py ] && [ -d benchmarks ] || { echo "$0: run this from the repository root" >&2; exit 2; }
data=${1:?data directory}; out=${2:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 200 python3 -m benchmarks.recipes --cuda --warmup 30 --steps 100 --rounds 3 --json "$out/benchmark_default_rounds3.json" 2>&1 | tee "$out/benchmark_default_rounds3.log"
timeout 120 python3 -m benchmarks.recipes --cuda --small --warmup 30 --steps 100 --rounds 3 --json "$out/benchmark_small_rounds3.json" 2>&1 | tee "$out/benchmark_small_rounds3.log"
small=(--data "$data" --emsize 64 --nhid 64 --log-interval 400 --epochs 2 --fp16 --dynamic-loss-scale)
{ python3 main_fp16_optimizer.py --cuda "${small[@]}" --save /tmp/a.pt | grep -E '\| (epoch|end of)'
  python3 main_fp16_optimizer.py --cuda "${small[@]}" --save /tmp/b.pt | grep -E '\| (epoch|end of)'; } 2>&1 | tee "$out/determinism.log"
