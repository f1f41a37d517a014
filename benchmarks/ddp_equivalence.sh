#!/usr/bin/env bash
# One process against torchrun's 2 ranks for every recipe, dropout 0, 2 epochs of a tiny model:
# the test perplexities, the largest relative difference of any loss the runs record, the skips.
#   bash benchmarks/ddp_equivalence.sh CORPUS_DIR OUT_DIR   (from the repository root)
set -euo pipefail
[ -f main.py ] && [ -d benchmarks ] || { echo "$0: run this from the repository root" >&2; exit 2; }
corpus=$(cd "${1:?corpus directory}" && pwd); mkdir -p "${2:?output directory}"; out=$(cd "$2" && pwd); repo=$(pwd)
common=(--data "$corpus" --emsize 16 --nhid 16 --batch_size 8 --bptt 10 --log-interval 5 --lr 5 --dropout 0 --epochs 2)
echo "| recipe | test ppl, 1 process | test ppl, 2 ranks | largest relative loss difference | skipped (1 / 2) |"
echo "| --- | ---: | ---: | ---: | ---: |"
while IFS='|' read -r name script flags; do
  d=$out/$(echo "$name" | tr -c 'a-zA-Z0-9\n' _); rm -rf "$d"; mkdir -p "$d/one" "$d/two"
  read -r -a extra <<< "$flags"
  (cd "$d/one" && OMP_NUM_THREADS=1 python3 "$repo/$script" "${common[@]}" "${extra[@]}" < /dev/null > out.txt 2>&1)
  (cd "$d/two" && OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 "$repo/$script" "${common[@]}" \
     "${extra[@]}" < /dev/null > out.txt 2>&1)
  python3 - "$d" "$name" <<'PY'
import json, sys
d, name = sys.argv[1], sys.argv[2]
runs = [[json.loads(line) for line in open(f'{d}/{n}/model.pt.metrics.jsonl')] for n in ('one', 'two')]
one, two = ([r for r in run if r['kind'] != 'run'] for run in runs)
loss = lambda r: r.get('loss', r.get('valid_loss', r.get('test_loss')))
worst = max(abs(loss(a) - loss(b)) / abs(loss(a)) for a, b in zip(one, two))
print(f"| {name} | {one[-1]['test_ppl']:.4f} | {two[-1]['test_ppl']:.4f} | {worst:.1e} "
      f"| {one[-1]['skipped']} / {two[-1]['skipped']} |")
PY
done <<'RECIPES'
fp32|main.py|
fp16 (scale 128)|main.py|--fp16
fp16 (scale 1e6, skips)|main.py|--fp16 --static-loss-scale 1e6
FP16_Optimizer static|main_fp16_optimizer.py|--fp16
FP16_Optimizer dynamic|main_fp16_optimizer.py|--fp16 --dynamic-loss-scale
amp|main.py|--amp
bf16|main.py|--bf16
RECIPES
