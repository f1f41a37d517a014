#!/usr/bin/env bash
# One epoch of the 200-unit LSTM (or what EXTRA asks for) on the first 3000 lines of WikiText-2 train (600 of valid
# and test) with every recipe, one after the other in one run, logs in OUT_DIR.
#   bash benchmarks/subset_runs.sh WIKITEXT2_DIR OUT_DIR [recipe ...]   (from the repository root)
# EXTRA holds flags added to every run, for another model:
#   EXTRA='--model Transformer --lr 5' bash benchmarks/subset_runs.sh WIKITEXT2_DIR OUT_DIR
# LINES=all trains on the whole data set instead (the CPU study in benchmarks/README.md):
#   LINES=all EXTRA='--emsize 64 --nhid 64 --log-interval 200' bash benchmarks/subset_runs.sh WIKITEXT2_DIR OUT_DIR \
#     fp16 fp16-scale1 fp32 bf16 opt-dynamic amp
set -euo pipefail
[ -f main.py ] && [ -d benchmarks ] || { echo "$0: run this from the repository root" >&2; exit 2; }
src=${1:?WikiText-2 directory}; out=${2:?output directory}; shift 2
recipes=${*:-fp32 fp16 opt-static opt-dynamic amp bf16}
mkdir -p "$out/data"
if [ "${LINES:-}" = all ]; then
  data=$src
else
  head -n 3000 "$src/train.txt" > "$out/data/train.txt"
  head -n 600 "$src/valid.txt" > "$out/data/valid.txt"
  head -n 600 "$src/test.txt" > "$out/data/test.txt"
  data=$out/data
fi
read -r -a extra <<< "${EXTRA:-}"
common=(--data "$data" --emsize 200 --nhid 200 --dropout 0.2 --epochs 1 --log-interval 50 "${extra[@]}")
for recipe in $recipes; do
  case $recipe in
    fp32) cmd=(main.py) ;;
    fp16) cmd=(main.py --fp16) ;;
    fp16-scale1) cmd=(main.py --fp16 --static-loss-scale 1) ;;
    opt-static) cmd=(main_fp16_optimizer.py --fp16) ;;
    opt-dynamic) cmd=(main_fp16_optimizer.py --fp16 --dynamic-loss-scale) ;;
    amp) cmd=(main.py --amp) ;;
    bf16) cmd=(main.py --bf16) ;;
    *) echo "unknown recipe $recipe" >&2; exit 2 ;;
  esac
  echo "== python ${cmd[*]} ${common[*]}" | tee "$out/$recipe.log"
  python3 "${cmd[@]}" "${common[@]}" --save "$out/$recipe.pt" 2>&1 | tee -a "$out/$recipe.log"
done
