#!/usr/bin/env bash
# The GPU check: every CUDA path of the example in one command, at most 6 minutes on one H100 or H200,
# at most 8 files in OUT_DIR. Each path gets one line in OUT_DIR/summary.txt: ok, FAIL (with the
# reason) or skip (with the reason); the script goes on after a failure and exits 1 if any path failed.
#
#   bash benchmarks/gpu_check.sh WIKITEXT2_DIR OUT_DIR                 (from the repository root, on the GPU)
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh CORPUS_DIR OUT_DIR   (the same on the CPU, tiny: proves the script)
#
# The paths: the benchmark of every recipe on apex's model with, per recipe, the precision of the
# RNN's and the decoder's matrix-product kernels (benchmarks/kernels.py); every recipe of both scripts
# on the LSTM (SGD) and on the Transformer (AdamW, fused on CUDA) for a few hundred batches of the
# first half of WikiText-2 train; SIGTERM then --resume against the uninterrupted run; torchrun
# --nproc_per_node 1 (NCCL) against the plain run; the metrics files; generate.py; --onnx-export; the
# CPU fp16 matmul fix staying off on CUDA. Budget on an H100 (from benchmarks/results/h100): the
# benchmark ~100 s (limit 150), the 14 training runs 4 at a time ~120 s (each limit 90 s, none running
# 270 s after the start), generate.py 2 x ~10 s (limit 30 s each): at most about 350 s in all.
#
# Files in OUT_DIR: summary.txt (one line per path, the device, seconds per step), runs.log (every
# command and its output, in order), benchmark.log and benchmark.json (benchmarks.recipes --profile),
# metrics.tar.gz (every run's SAVE.metrics.jsonl), generated.txt (the samples). The WikiText-2
# subset, checkpoints and ONNX files stay in a temporary directory, removed at the end.
set -u
[ -f main.py ] && [ -d benchmarks ] || { echo "$0: run this from the repository root" >&2; exit 2; }
src=$(cd "${1:?WikiText-2 directory (train.txt, valid.txt, test.txt)}" 2> /dev/null && pwd) || { echo "$0: $1: no such directory" >&2; exit 2; }
mkdir -p "${2:?output directory}" && out=$(cd "$2" && pwd) || exit 2
repo=$(pwd)
tiny=${GPU_CHECK_TINY:-0}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
started=$SECONDS
summary=$out/summary.txt
rm -f "$summary" "$out/runs.log" "$out/benchmark.log" "$out/benchmark.json" "$out/metrics.tar.gz" "$out/generated.txt"
failed=0
say() { echo "$*" | tee -a "$summary"; }
verdict() {  # verdict ok|FAIL|skip PATH MESSAGE
  [ "$1" = FAIL ] && failed=1
  say "$(printf '%-5s %-34s %s' "$1" "$2" "$3")"
}

# The first half of train (by lines), whole valid and test: the data of every run.
mkdir -p "$work/data"
lines=$(wc -l < "$src/train.txt")
head -n $((lines / 2)) "$src/train.txt" > "$work/data/train.txt"
cp "$src/valid.txt" "$src/test.txt" "$work/data/"
data=$work/data

if [ "$tiny" = 1 ]; then
  export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=
  dev=()
  lstm=(--emsize 16 --nhid 16 --batch_size 8 --bptt 10 --log-interval 5)
  transformer=(--model Transformer --emsize 16 --nhid 16 --nhead 2 --batch_size 8 --bptt 10 --log-interval 5)
  stop_epochs=8  # long enough for the SIGTERM to land mid-run
  bench=(--smoke --emsize 24 --nhid 24 --in-process)
  jobs_max=2 rtol=0
  # A busy 2-core machine may take minutes: the limits below are the GPU's, ten times over.
  pool_seconds=3000 job_seconds=900 bench_seconds=1500
  say "GPU check, tiny mode on the CPU (GPU_CHECK_TINY=1): the script proven, not the GPU"
else
  dev=(--cuda)
  # A few hundred batches: 80 columns of the first half of train are 373 batches of 35 words.
  lstm=(--emsize 512 --nhid 512 --batch_size 80 --log-interval 100)
  transformer=(--model Transformer --emsize 256 --nhid 256 --nhead 2 --batch_size 80 --log-interval 100)
  stop_epochs=2
  bench=(--cuda --warmup 20 --steps 40)
  # cuDNN and atomics may order sums differently from run to run: a resumed run and torchrun
  # are held to 1e-4 of the uninterrupted run's numbers (the CPU to 0: bit for bit).
  jobs_max=${GPU_CHECK_JOBS:-4} rtol=${GPU_CHECK_RTOL:-1e-4}
  pool_seconds=270 job_seconds=90 bench_seconds=150
  say "GPU check: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
fi
say "$(python3 -c '
import torch, model
c, gpu = torch.backends.cudnn, torch.cuda.is_available()
rnn = ("bf16 (cuDNN)" if model.cudnn_runs_bf16_rnn(torch.device("cuda")) else "fp32") if gpu else "no GPU here"
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn", c.version() if c.is_available() else None,
      "| the RNN under --bf16:", rnn)' 2>&1 | tail -1)"
say "data: first $((lines / 2)) of $lines lines of $src/train.txt, all of valid and test"

# ------------------------------------------------------------------------------ the benchmark
t=$SECONDS
timeout -s TERM -k 10 $bench_seconds python3 -m benchmarks.recipes "${bench[@]}" --profile --json "$out/benchmark.json" \
  > "$out/benchmark.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  verdict FAIL benchmark "exit code $rc after $((SECONDS - t)) s (benchmark.log)"
else
  verdict ok benchmark "every recipe, $((SECONDS - t)) s"
  verdict_text=$(python3 -m benchmarks.gpu_check kernels "$out/benchmark.json" 2>&1)
  if [ $? -eq 0 ]; then verdict ok "matrix-product precision" "$(echo "$verdict_text" | tail -1)"
  else verdict FAIL "matrix-product precision" "$(echo "$verdict_text" | tail -1)"; fi
  echo "$verdict_text" | head -n -1 | sed 's/^/        /' | tee -a "$summary"
fi

# ------------------------------------------------------------------------------ training runs
deadline=$((started + pool_seconds))
# The seconds a command may still take: job_seconds, and nothing past the deadline.
limit() {
  local left=$((deadline - SECONDS))
  [ $left -gt $job_seconds ] && left=$job_seconds
  [ $left -lt 1 ] && left=1
  echo $left
}
# job NAME SCRIPT FLAGS...: train in $work/NAME (--save model.pt), output in $work/NAME/log, exit code in rc.
job() {
  local name=$1 script=$2; shift 2
  local dir=$work/$name
  mkdir -p "$dir"
  echo "python3 $script $*" > "$dir/cmd"
  if [ $((deadline - SECONDS)) -le 5 ]; then
    echo "not started: the time budget was spent" > "$dir/log"; echo 124 > "$dir/rc"; return
  fi
  local t=$SECONDS
  (cd "$dir" && timeout -s TERM -k 10 "$(limit)" python3 "$repo/$script" "$@" --save model.pt < /dev/null > log 2>&1)
  echo $? > "$dir/rc"
  echo $((SECONDS - t)) > "$dir/seconds"
}
# stopped NAME SCRIPT FLAGS...: the same run, stopped by SIGTERM at its first progress line of epoch 2,
# then continued with --resume model.pt.resume and the same flags.
stopped() {
  local name=$1 script=$2; shift 2
  local dir=$work/$name t=$SECONDS
  mkdir -p "$dir"
  echo "python3 $script $* (SIGTERM in epoch 2), then again with --resume model.pt.resume" > "$dir/cmd"
  (cd "$dir" && exec timeout -s TERM -k 10 "$(limit)" python3 "$repo/$script" "$@" --save model.pt < /dev/null > first.log 2>&1) &
  local pid=$!
  for _ in $(seq $((job_seconds * 10))); do
    grep -q '^| epoch   2 |' "$dir/first.log" 2>/dev/null && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
  done
  pkill -TERM -P $pid 2>/dev/null || true  # the python3 that this job's timeout runs
  wait $pid
  echo $? > "$dir/first.rc"
  (cd "$dir" && timeout -s TERM -k 10 "$(limit)" python3 "$repo/$script" "$@" --save model.pt --resume model.pt.resume \
     < /dev/null > log 2>&1)
  echo $? > "$dir/rc"
  echo $((SECONDS - t)) > "$dir/seconds"
}
torchrun1() {
  local name=$1 script=$2; shift 2
  local dir=$work/$name t=$SECONDS
  mkdir -p "$dir"
  echo "torchrun --standalone --nproc_per_node 1 $script $*" > "$dir/cmd"
  (cd "$dir" && NCCL_DEBUG=INFO timeout -s TERM -k 10 "$(limit)" python3 -m torch.distributed.run --standalone \
     --nproc_per_node 1 "$repo/$script" "$@" --save model.pt < /dev/null > log 2>&1)
  echo $? > "$dir/rc"
  echo $((SECONDS - t)) > "$dir/seconds"
}
spawn() {
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
  "$@" &
}

recipes=('fp32|main.py|' 'fp16|main.py|--fp16' 'amp|main.py|--amp' 'bf16|main.py|--bf16'
         'opt-static|main_fp16_optimizer.py|--fp16' 'opt-dynamic|main_fp16_optimizer.py|--fp16 --dynamic-loss-scale')
# lstm-fp16 is also the reference for --resume and torchrun: dropout 0 (cuDNN's dropout state
# cannot be saved), and long enough for a SIGTERM to land in epoch 2.
reference=(--fp16 --dropout 0 --epochs "$stop_epochs" "${lstm[@]}" "${dev[@]}" --data "$data")
# --onnx-export rides on lstm-fp32 where its packages are installed (else: skip, saying so).
onnx=()
python3 -c 'import onnx, onnxscript' 2> /dev/null && onnx=(--onnx-export model.onnx)
spawn stopped resumed main.py "${reference[@]}"
spawn torchrun1 torchrun main.py "${reference[@]}"
for model in lstm transformer; do
  for entry in "${recipes[@]}"; do
    IFS='|' read -r name script flags <<< "$entry"
    read -r -a extra <<< "$flags"
    if [ $model = lstm ]; then sizes=("${lstm[@]}"); else sizes=("${transformer[@]}" --use-optimizer --lr 0.001); fi
    case $model-$name in
      lstm-fp16) spawn job lstm-fp16 main.py "${reference[@]}" ;;
      lstm-fp32) spawn job lstm-fp32 main.py --epochs 1 "${sizes[@]}" "${dev[@]}" --data "$data" "${onnx[@]}" ;;
      *) spawn job "$model-$name" "$script" "${extra[@]}" --epochs 1 "${sizes[@]}" "${dev[@]}" --data "$data" ;;
    esac
  done
done
wait

# ------------------------------------------------------------------------------ verdicts
append_log() {  # the command, its time and exit code, and its output, to runs.log
  local dir=$work/$1
  { echo "== $1: $(cat "$dir/cmd") | $(cat "$dir/seconds" 2>/dev/null || echo '?') s | exit code $(cat "$dir/rc")"
    [ -f "$dir/first.log" ] && { cat "$dir/first.log"; echo "-- --resume:"; }
    cat "$dir/log"; echo; } >> "$out/runs.log"
}
trained() {  # trained NAME: ok if it exited 0 without a traceback and its metrics file is whole
  local dir=$work/$1 rc
  rc=$(cat "$dir/rc")
  append_log "$1"
  if [ "$rc" != 0 ]; then
    verdict FAIL "$1" "exit code $rc: $(grep -v '^\s*$' "$dir/log" | tail -1 | cut -c1-200)"; return 1
  fi
  if grep -q Traceback "$dir/log"; then verdict FAIL "$1" "a traceback (runs.log)"; return 1; fi
  local m
  m=$(python3 -m benchmarks.gpu_check metrics "$dir/model.pt.metrics.jsonl" 2>&1)
  if [ $? -ne 0 ]; then verdict FAIL "$1" "$m"; return 1; fi
  verdict ok "$1" "$(cat "$dir/seconds") s, test ppl $(grep -o 'test ppl *[0-9.]*' "$dir/log" | tail -1 | grep -o '[0-9.]*$')"
}
for model in lstm transformer; do
  for entry in "${recipes[@]}"; do
    trained "$model-${entry%%|*}"
  done
done
if trained resumed; then
  first_rc=$(cat "$work/resumed/first.rc")
  if [ "$first_rc" != 143 ]; then
    verdict FAIL "SIGTERM then --resume" "the first run exited $first_rc, not 143 (stopped by SIGTERM)"
  elif ! grep -q 'SIGTERM: stopping' "$work/resumed/first.log"; then
    verdict FAIL "SIGTERM then --resume" "the first run ended before the SIGTERM landed"
  else
    m=$(python3 -m benchmarks.gpu_check same "$work/lstm-fp16/model.pt.metrics.jsonl" \
        "$work/resumed/model.pt.metrics.jsonl" --rtol "$rtol" 2>&1)
    if [ $? -eq 0 ]; then verdict ok "SIGTERM then --resume" "$m"; else verdict FAIL "SIGTERM then --resume" "$m"; fi
  fi
fi
if trained torchrun; then
  if [ "$tiny" != 1 ] && ! grep -q 'NCCL INFO' "$work/torchrun/log"; then
    verdict FAIL "torchrun --nproc_per_node 1" "NCCL said nothing (NCCL_DEBUG=INFO): not the NCCL path"
  elif ! grep -q '^| torchrun: 1 processes' "$work/torchrun/log"; then
    verdict FAIL "torchrun --nproc_per_node 1" "the run did not join a process group"
  else
    backend=$([ "$tiny" = 1 ] && echo gloo || echo NCCL)
    m=$(python3 -m benchmarks.gpu_check same "$work/lstm-fp16/model.pt.metrics.jsonl" \
        "$work/torchrun/model.pt.metrics.jsonl" --rtol "$rtol" 2>&1)
    if [ $? -eq 0 ]; then verdict ok "torchrun --nproc_per_node 1" "$backend: $m"
    else verdict FAIL "torchrun --nproc_per_node 1" "$backend: $m"; fi
  fi
fi
if [ ${#onnx[@]} -eq 0 ]; then
  verdict skip "--onnx-export" "onnx and onnxscript are not installed here (pip install -r requirements-onnx.txt)"
else
  size=$(stat -c %s "$work/lstm-fp32/model.onnx" 2>/dev/null || echo 0)
  if [ "$size" -gt 0 ]; then verdict ok "--onnx-export" "lstm-fp32's best model, $size bytes"
  else verdict FAIL "--onnx-export" "lstm-fp32 wrote no model.onnx"; fi
fi
if [ "$tiny" = 1 ]; then
  verdict skip "CPU fp16 matmul fix off on CUDA" "no CUDA here"
elif grep -l 'this CPU has no fp16 arithmetic' "$work"/*/log > /dev/null 2>&1; then
  verdict FAIL "CPU fp16 matmul fix off on CUDA" "a CUDA run said it emulates fp16 products: $(grep -l 'this CPU has no fp16' "$work"/*/log | head -1)"
else
  verdict ok "CPU fp16 matmul fix off on CUDA" "no CUDA run replaced its fp16 products"
fi
(cd "$work" && tar czf "$out/metrics.tar.gz" */model.pt.metrics.jsonl 2>/dev/null)
verdict "$([ -s "$out/metrics.tar.gz" ] && echo ok || echo FAIL)" "metrics files" "$(cd "$work" && ls */model.pt.metrics.jsonl 2>/dev/null | wc -l) in metrics.tar.gz"

# ------------------------------------------------------------------------------ generate.py
for model in lstm-fp16 transformer-bf16; do
  t=$SECONDS
  gen=(generate.py "${dev[@]}" --checkpoint "$work/$model/model.pt" --words 60 --outf "$work/$model.txt")
  echo "== python3 ${gen[*]}" >> "$out/runs.log"
  if [ ! -f "$work/$model/model.pt" ]; then
    verdict FAIL "generate.py ($model)" "no checkpoint: its training run failed"; continue
  fi
  timeout -s TERM -k 5 $((job_seconds / 3)) python3 "${gen[@]}" >> "$out/runs.log" 2>&1
  rc=$?
  words=$(wc -w < "$work/$model.txt" 2>/dev/null || echo 0)
  { echo "== $model"; cat "$work/$model.txt" 2>/dev/null; } >> "$out/generated.txt"
  if [ $rc -eq 0 ] && [ "$words" -ge 60 ]; then verdict ok "generate.py ($model)" "$words words, $((SECONDS - t)) s"
  else verdict FAIL "generate.py ($model)" "exit code $rc, $words words"; fi
done

say "$( [ $failed = 0 ] && echo 'all paths ok' || echo 'some paths FAILED' ) in $((SECONDS - started)) s; files: $(cd "$out" && ls | tr '\n' ' ')"
exit $failed
