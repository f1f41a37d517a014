#!/usr/bin/env bash
# apex's claim, slot by slot: `main.py --cuda --fp16` with its defaults (40 epochs) reaches test ppl about 90
# with loss scale 128 and about 93 with scale 1. One run takes about 10.5 minutes of an H100 (5.2 ms a
# step, evaluation and saves included), more than one command may run (10 minutes), so a slot runs it as
# two commands: `start` trains until SIGTERM stops it (CLAIM_SECONDS, default 520 s), `continue` goes on
# from its SAVE.resume with the same flags (as often as needed, until the test record is written).
#
#   bash benchmarks/claim_runs.sh start DATA OUT RUN [RUN]   # one run, or two side by side on the one GPU
#   bash benchmarks/claim_runs.sh continue DATA OUT          # every started run that has not ended
#   bash benchmarks/claim_runs.sh probe DATA OUT             # ms/batch of fp16-128 alone, then beside fp16-1
#   python3 -m benchmarks.gpu_check table OUT/*.metrics.jsonl   # the README's Results rows
#
# RUN is one of: fp16-128 (main.py --fp16), fp16-1 (--static-loss-scale 1), fp32 (main.py),
# opt-dynamic (main_fp16_optimizer.py --fp16 --dynamic-loss-scale), amp (main.py --amp), bf16 (main.py --bf16).
# DATA is the whole WikiText-2 (train.txt, valid.txt, test.txt). Checkpoints, SAVE.resume, the metrics
# files and the logs live in CLAIM_STATE (default .claim_runs/ in the repository, git-ignored), which
# the GPU machine keeps between the two commands; each command copies RUN.log (every command's output
# so far) and RUN.metrics.jsonl of its runs to OUT, which may be a new, empty folder each time.
# CLAIM_TINY=1: the same on the CPU with a tiny model (the tests prove the script with it).
set -u
[ -f main.py ] && [ -d benchmarks ] || { echo "$0: run this from the repository root" >&2; exit 2; }
usage="usage: $0 start DATA OUT RUN [RUN] | continue DATA OUT | probe DATA OUT"
command=${1:?$usage}
data=$(cd "${2:?$usage}" 2> /dev/null && pwd) || { echo "$0: $2: no such directory" >&2; exit 2; }
mkdir -p "${3:?$usage}" && out=$(cd "$3" && pwd) || exit 2
shift 3
repo=$(pwd)
state=${CLAIM_STATE:-$repo/.claim_runs}
mkdir -p "$state"
seconds=${CLAIM_SECONDS:-520}  # leaves the stop, its save and test, and the start-up within 10 minutes
export PYTHONUNBUFFERED=1 PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
if [ "${CLAIM_TINY:-0}" = 1 ]; then
  export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=
  common=(--emsize 16 --nhid 16 --batch_size 8 --bptt 10 --log-interval 5 --epochs "${CLAIM_EPOCHS:-40}")
else
  common=(--cuda --epochs "${CLAIM_EPOCHS:-40}")  # apex's defaults otherwise: 1504 units, dropout 0.65, lr 20
fi

flags_of() {  # the script and flags of a run
  case $1 in
    fp16-128) echo "main.py --fp16" ;;
    fp16-1) echo "main.py --fp16 --static-loss-scale 1" ;;
    fp32) echo "main.py" ;;
    opt-dynamic) echo "main_fp16_optimizer.py --fp16 --dynamic-loss-scale" ;;
    amp) echo "main.py --amp" ;;
    bf16) echo "main.py --bf16" ;;
    *) echo "$0: unknown run $1 (fp16-128, fp16-1, fp32, opt-dynamic, amp, bf16)" >&2; return 2 ;;
  esac
}

ended() {  # whether run $1 wrote its test record after its last epoch (not a stop's test)
  python3 - "$state/$1.pt.metrics.jsonl" <<'PY'
import json, sys
try:
    records = [json.loads(line) for line in open(sys.argv[1])]
except OSError:
    sys.exit(1)
sys.exit(0 if records and records[-1]['kind'] == 'end' and not records[-1].get('stopped') else 1)
PY
}

# train RUN LIMIT [--resume FILE]: one command of the run, stopped by SIGTERM after LIMIT seconds;
# its output is appended to RUN.log, which is copied to OUT with the metrics file.
train() {
  local run=$1 limit=$2; shift 2
  local spec
  spec=$(flags_of "$run") || return 2
  read -r -a cmd <<< "$spec"
  echo "== $(date -u +%FT%TZ) python3 ${cmd[*]} ${common[*]} --data DATA --save $state/$run.pt $* (SIGTERM after $limit s)" \
    >> "$state/$run.log"
  timeout --preserve-status -s TERM -k 60 "$limit" python3 "${cmd[@]}" "${common[@]}" --data "$data" --save "$state/$run.pt" "$@" \
    < /dev/null >> "$state/$run.log" 2>&1
  local rc=$?
  echo "== exit code $rc" >> "$state/$run.log"
  cp "$state/$run.log" "$out/$run.log"
  cp "$state/$run.pt.metrics.jsonl" "$out/$run.metrics.jsonl" 2>/dev/null
  return $rc
}

resume_or_start() {  # continue RUN from its SAVE.resume, or start it again if it never saved one
  local run=$1 limit=$2
  if ended "$run"; then
    echo "$run: ended already"; return 0
  fi
  local rc
  if [ -f "$state/$run.pt.resume" ]; then
    train "$run" "$limit" --resume "$state/$run.pt.resume"
  else
    train "$run" "$limit"
  fi
  rc=$?
  if ended "$run"; then echo "$run: ended"
  elif [ $rc = 143 ]; then echo "$run: stopped; run continue again"
  else echo "$run: failed with exit code $rc (see $run.log)"; return 1; fi
}
all_of() {  # all_of RUN...: resume_or_start every run at once; exit code 1 if any failed
  local pids=() failed=0
  for run in "$@"; do resume_or_start "$run" "$seconds" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  return $failed
}

ms_per_batch() {  # the median ms/batch of a metrics file's progress lines, the first left out (warm-up); nan if none
  python3 - "$1" <<'PY'
import json, statistics, sys
try:
    ms = [r['ms_per_batch'] for r in map(json.loads, open(sys.argv[1])) if r['kind'] == 'train'][1:]
except OSError:
    ms = []
print(f'{statistics.median(ms):.2f}' if ms else 'nan')
PY
}

case $command in
  start)
    [ $# -ge 1 ] && [ $# -le 2 ] || { echo "$usage" >&2; exit 2; }
    for run in "$@"; do
      flags_of "$run" > /dev/null || exit 2
      rm -f "$state/$run".* "$out/$run.log" "$out/$run.metrics.jsonl"
    done
    all_of "$@"
    ;;
  continue)
    [ $# -eq 0 ] || { echo "$usage" >&2; exit 2; }
    runs=$(cd "$state" && ls -- *.log 2>/dev/null | sed 's/\.log$//')
    [ -n "$runs" ] || { echo "$0: no run in $state to continue (start one first)" >&2; exit 2; }
    all_of $runs
    ;;
  probe)
    # fp16-128 alone, then fp16-128 and fp16-1 side by side, PROBE_SECONDS (default 30) each.
    probe=${PROBE_SECONDS:-30}
    mkdir -p "$state/probe" "$out/probe"
    state=$state/probe out_all=$out out=$out/probe
    rm -f "$state"/* "$out"/*
    train fp16-128 "$probe"; mv "$state/fp16-128.pt.metrics.jsonl" "$state/alone.jsonl" 2> /dev/null
    rm -f "$state"/*.pt "$state"/*.resume "$state"/*.log "$out"/*.log
    train fp16-128 "$probe" & train fp16-1 "$probe" & wait
    alone=$(ms_per_batch "$state/alone.jsonl")
    a=$(ms_per_batch "$state/fp16-128.pt.metrics.jsonl"); b=$(ms_per_batch "$state/fp16-1.pt.metrics.jsonl")
    python3 - "$alone" "$a" "$b" "${CLAIM_SLOT_MINUTES:-12}" > "$out_all/probe.txt" <<'PY'
import math, sys
alone, a, b, slot = map(float, sys.argv[1:])
if math.isnan(alone + a + b):
    sys.exit('probe: some run printed fewer than 2 progress lines in its time: give PROBE_SECONDS more.')
# 40 epochs of 2486 batches; evaluation and saves add about 22% (10.5 min at 5.2 ms/batch).
minutes = lambda ms: 40 * 2486 * ms / 60000 * 1.22
pair = minutes(max(a, b))
print(f'probe: fp16-128 alone {alone:.2f} ms/batch; side by side fp16-128 {a:.2f} and fp16-1 {b:.2f} ms/batch. '
      f'40 epochs: one run alone about {minutes(alone):.1f} min, the pair about {pair:.1f} min: '
      f'{"start both at once" if pair <= slot else "one run a slot"} (a slot holds {slot:g} min of training).')
PY
    rc=$?
    cat "$out_all/probe.txt"
    rm -rf "$out"
    exit $rc
    ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
