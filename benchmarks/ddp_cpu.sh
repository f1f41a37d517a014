#!/usr/bin/env bash
# Tokens/s on the CPU with one process (all cores, and one thread) and with torchrun's 2 processes
# (one thread each), on the first 3000 lines of WikiText-2 train: a 64-unit LSTM, one epoch each.
#   bash benchmarks/ddp_cpu.sh WIKITEXT2_DIR OUT_DIR   (from the repository root)
# Then: python3 -m benchmarks.metrics_table OUT_DIR/*.metrics.jsonl
set -euo pipefail
[ -f main.py ] && [ -d benchmarks ] || { echo "$0: run this from the repository root" >&2; exit 2; }
src=${1:?WikiText-2 directory}; out=${2:?output directory}
mkdir -p "$out/data"
head -n 3000 "$src/train.txt" > "$out/data/train.txt"
head -n 600 "$src/valid.txt" > "$out/data/valid.txt"
head -n 600 "$src/test.txt" > "$out/data/test.txt"
common=(--data "$out/data" --emsize 64 --nhid 64 --dropout 0 --epochs 1 --log-interval 20)
echo "== 1 process, $(nproc) threads" | tee "$out/one.log"
python3 main.py "${common[@]}" --save "$out/one.pt" >> "$out/one.log" 2>&1
echo "== 1 process, 1 thread" | tee "$out/one-thread.log"
OMP_NUM_THREADS=1 python3 main.py "${common[@]}" --save "$out/one-thread.pt" >> "$out/one-thread.log" 2>&1
echo "== torchrun, 2 processes of 1 thread" | tee "$out/two.log"
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 main.py "${common[@]}" --save "$out/two.pt" >> "$out/two.log" 2>&1
for run in one one-thread two; do
  python3 - "$out/$run.pt.metrics.jsonl" <<'PY'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1])]
train = [r['tokens_per_s'] for r in records if r['kind'] == 'train'][1:]  # the first line holds the warm-up
end = records[-1]
print(f"| {sys.argv[1]} | processes {records[0]['processes']} | median tokens/s {statistics.median(train):.0f} "
      f"| test ppl {end['test_ppl']:.2f}")
PY
done
