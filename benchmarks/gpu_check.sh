#!/usr/bin/env bash
# The GPU check (about 4 minutes on one H100): the benchmark of every recipe on apex's
# model and on --small, the fused-vs-per-parameter FP16_Optimizer update, 2 epochs of
# apex's `main.py --cuda --fp16` against fp32 on the first half of WikiText-2, and short
# functional runs of every mode, --accel, --resume and generate.py on the GPU.
#   bash benchmarks/gpu_check.sh DATA_DIR OUT_DIR      (from the repository root)
set -u
[ -f main.py ] && [ -d benchmarks ] || { echo "$0: run this from the repository root" >&2; exit 2; }
data=${1:?data directory (train.txt = first half of WikiText-2 train)}
out=${2:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
  python3 -m benchmarks.fp16_optimizer --cuda --steps 50; } 2>&1 | tee "$out/device_and_optimizer_step.log"
timeout 120 python3 -m benchmarks.recipes --cuda --warmup 30 --steps 60 --profile --json "$out/benchmark_default.json" 2>&1 | tee "$out/benchmark_default.log"
timeout 60 python3 -m benchmarks.recipes --cuda --small --warmup 30 --steps 100 --json "$out/benchmark_small.json" 2>&1 | tee "$out/benchmark_small.log"
timeout 100 python3 main.py --cuda --fp16 --epochs 2 --data "$data" --save /tmp/fp16.pt 2>&1 | tee "$out/main_fp16_2epochs.log"
timeout 170 python3 main.py --cuda --epochs 2 --data "$data" --save /tmp/fp32.pt 2>&1 | tee "$out/main_fp32_2epochs.log"
small=(--data "$data" --emsize 64 --nhid 64 --log-interval 400)
{ set -x
  python3 main.py --cuda --amp --epochs 1 "${small[@]}" --save /tmp/amp.pt
  python3 main.py --accel --bf16 --epochs 1 "${small[@]}" --save /tmp/bf16.pt
  python3 main_fp16_optimizer.py --accel --fp16 --dynamic-loss-scale --epochs 2 "${small[@]}" --save /tmp/dyn2.pt
  python3 main_fp16_optimizer.py --accel --fp16 --dynamic-loss-scale --epochs 1 "${small[@]}" --save /tmp/dyn1.pt
  python3 main_fp16_optimizer.py --accel --fp16 --dynamic-loss-scale --epochs 2 "${small[@]}" --save /tmp/dyn1.pt --resume /tmp/dyn1.pt.resume
  python3 generate.py --cuda --checkpoint /tmp/fp16.pt --words 40 --outf /tmp/g1.txt && cat /tmp/g1.txt
  python3 generate.py --accel --checkpoint /tmp/dyn2.pt --words 40 --outf /tmp/g2.txt && cat /tmp/g2.txt
  python3 generate.py --checkpoint /tmp/fp16.pt --words 40 --outf /tmp/g3.txt && cat /tmp/g3.txt
} 2>&1 | tee "$out/functional.log"
