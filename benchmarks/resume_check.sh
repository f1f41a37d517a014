#!/usr/bin/env bash
# Train 2 epochs in one go, and 1 + 1 with --resume in between; print both loss sequences.
#   bash benchmarks/resume_check.sh DATA_DIR OUT_DIR [extra training flags, e.g. --fp16]   (from the repository root)
set -euo pipefail
[ -f main.py ] && [ -d benchmarks ] || { echo "$0: run this from the repository root" >&2; exit 2; }
data=${1:?data directory}; out=${2:?output directory}; shift 2
mkdir -p "$out/once" "$out/resumed"
flags=(--data "$(cd "$data" && pwd)" --emsize 64 --nhid 64 --dropout 0.2 --log-interval 50 "$@")
repo=$(pwd)
(cd "$out/once" && python3 "$repo/main.py" "${flags[@]}" --epochs 2 > train.log 2>&1)
(cd "$out/resumed" && python3 "$repo/main.py" "${flags[@]}" --epochs 1 > first.log 2>&1 &&
  python3 "$repo/main.py" "${flags[@]}" --epochs 2 --resume model.pt.resume > second.log 2>&1)
losses() { cat "$@" | grep -E '^\| (epoch|end of epoch|End of)' | sed -E 's/ms\/batch +[0-9.]+|tok\/s +[0-9]+|eta +[0-9]+s|time: +[0-9.]+s//g'; }
resumed() { losses "$out/resumed/first.log" | grep -v 'End of training'; losses "$out/resumed/second.log"; }
echo "== 2 epochs in one go"; losses "$out/once/train.log"
echo "== 1 epoch, then --resume to 2"; resumed
if diff <(losses "$out/once/train.log") <(resumed) > /dev/null; then echo "== identical"; else echo "== DIFFERENT"; exit 1; fi
