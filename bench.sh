#!/usr/bin/env bash
# Sweep sizes x methods x seeds and collect perplexity, memory and speed into one table.
#
#   bash bench.sh                        # GPU: 60m 130m 350m (+1b with >= 70 GiB) on C4 at 10% of the papers' steps
#                                        # CPU: tiny on the embedded Shakespeare corpus (the scripts' CPU recipe)
#   bash bench.sh --budget 0.05          # 5% of the papers' steps
#   bash bench.sh --max-steps 20         # a fixed number of steps for every run
#   bash bench.sh --smoke                # GPU smoke sweep: every method at 60m, 100 steps of 128 x 256 tokens
#   bash bench.sh --dry-run              # print the runs, run nothing
#   SEEDS="0 1 2" bash bench.sh          # several seeds: results.md gives the mean and the spread
#   SIZES="60m 130m" METHODS="full galore" bash bench.sh
#   OUT=results/2026-11-25-cpu bash bench.sh   # resume a sweep: finished runs with the same settings are skipped,
#                                              # unfinished ones (a ckpt.pt, no result.json) continue with --resume
#   LR=1e-2 bash bench.sh                # one learning rate for every method
#
# Every run is `python <script> <its row's flags>`, the script and flags coming from model.py's recipe table
# (`python model.py --bench-command ROWS SIZES`), the same defaults a direct run of the script uses. The papers'
# budgets: 512 sequences x 256 tokens = 131,072 tokens per step, 60m 10K steps (1.3B tokens), 130m 20K (2.6B),
# 350m 60K (7.9B), 1b 100K (13.1B); --budget scales the steps (GPU default 0.1: a 350m run is then 6,000 steps,
# 786M tokens, per method). The CPU default is the scripts' tiny recipe: 100 steps of 8 x 256 tokens, with the
# methods' periods (projector refresh, restarts, merges) at 25 steps so that they act. matplotlib, if
# installed, draws the loss curves (pip install matplotlib, then python report.py OUT).
#
# Output: $OUT/runs/<row>_<size>_s<seed>/{result.json,log.jsonl,train.log} (or failed.json with the reason, and
# the ckpt.pt a rerun continues from; a finished run's checkpoint is removed),
# then $OUT/results.md, $OUT/results.csv and $OUT/loss_<size>.png (report.py), of this sweep's runs alone. A run
# whose recorded command differs from this sweep's is stale and runs again; a folder a live run holds locked is
# left alone. SIGTERM or Ctrl-C stops the training run with SIGTERM (it checkpoints) and then the sweep. The exit
# status is 1 if any run failed or report.py did, 2 if a row of METHODS is unknown (before any run).
set -uo pipefail
cd "$(dirname "$0")"

BUDGET=${BUDGET:-}
STEPS=""
SMOKE=0
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET="$2"; shift 2 ;;
        --max-steps) STEPS="$2"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument '$1' (see bash bench.sh --help)" >&2; exit 2 ;;
    esac
done

# glibc returns every allocation above 32 MiB to the OS and page-faults it back in on the next step;
# keeping them (the logits alone are B*T x 50304 floats) makes CPU training about 1.7x faster
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=1073741824

GPU_MEM=$(python -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30 \
    if torch.cuda.is_available() else 0)")
if [ "$GPU_MEM" -gt 0 ]; then
    DEVICE=$(python -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-'))")
    DEFAULT_SIZES="60m 130m 350m"
    [ "$GPU_MEM" -ge 70 ] && DEFAULT_SIZES="$DEFAULT_SIZES 1b"
    DEFAULT_DATASET=c4
    BUDGET=${BUDGET:-0.1}
else
    DEVICE=cpu
    DEFAULT_SIZES="tiny"
    DEFAULT_DATASET=shakespeare
fi
EXTRA=()
if [ "$SMOKE" = 1 ]; then  # every method once, quickly, on the embedded corpus: a check, not a benchmark
    DEFAULT_SIZES="60m"
    DEFAULT_DATASET=shakespeare
    STEPS=${STEPS:-100}
    EXTRA=(--global-batch 128 --eval-every "$STEPS")  # one validation, at the end: the sweep's time is training
    DEVICE="$DEVICE-smoke"
fi
SIZES=${SIZES:-$DEFAULT_SIZES}
DATASET=${DATASET:-$DEFAULT_DATASET}
METHODS=${METHODS:-$(python -c "import model; print(' '.join(model.BENCH_ROWS))")}
SEEDS=${SEEDS:-0}
OUT=${OUT:-results/$(date +%F)-$DEVICE}
if [ -n "$STEPS" ]; then
    EXTRA+=(--max-steps "$STEPS")
elif [ -n "$BUDGET" ]; then
    EXTRA+=(--budget "$BUDGET")
fi
[ -n "${LR:-}" ] && EXTRA+=(--lr "$LR")

if [ "$DATASET" != shakespeare ] && [ ! -f "data/$DATASET/meta.json" ]; then
    echo "error: dataset '$DATASET' is not prepared; run: python data.py $DATASET (or DATASET=shakespeare)" >&2
    exit 1
fi

declare -A COMMAND  # every row of the sweep, checked before the first run: a typo in METHODS runs nothing
commands=$(python model.py --bench-command "$METHODS" "$SIZES") || exit 2
while read -r size method command; do
    COMMAND[$method,$size]=$command
done <<< "$commands"

# SIGTERM or Ctrl-C: the running training run gets SIGTERM (it checkpoints and exits; a run started in the
# background ignores SIGINT), and the sweep stops when it has
child=""
stop() {
    trap - TERM INT
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child"
    echo "bench: stopped by SIG$1; run the same command again to resume the sweep" >&2
    exit $((128 + $(kill -l "$1")))
}
trap 'stop TERM' TERM
trap 'stop INT' INT

in_use() {  # whether a training run holds the lock of folder $1 (a live run: never delete it)
    [ -f "$1/.lock" ] && ! python -c "import fcntl, sys; fcntl.flock(open(sys.argv[1]), fcntl.LOCK_EX | fcntl.LOCK_NB)" \
        "$1/.lock" 2>/dev/null
}

[ "$DRY" = 1 ] || mkdir -p "$OUT/runs"
echo "bench: sizes [$SIZES] methods [$METHODS] seeds [$SEEDS] on $DEVICE, dataset $DATASET -> $OUT"
failed=0
sweep=()  # this sweep's run folders: the table holds them alone
for size in $SIZES; do
    for method in $METHODS; do
        read -r -a cmd <<< "${COMMAND[$method,$size]}"
        for seed in $SEEDS; do
            run="$OUT/runs/${method}_${size}_s${seed}"
            args=("${cmd[@]:1}" --size "$size" --dataset "$DATASET" --seed "$seed" "${EXTRA[@]}" --out-dir "$run")
            if [ "$DRY" = 1 ]; then echo "python ${cmd[0]} ${args[*]}"; continue; fi
            sweep+=("$run")
            if in_use "$run"; then
                echo "[busy] $method $size seed $seed: a run is using $run; left alone"
                continue
            fi
            resume=()
            if [ -f "$run/result.json" ]; then
                # the script records its own command line: the same one means the same run
                if python -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['argv'] != sys.argv[2:])" \
                        "$run/result.json" "${args[@]}"; then
                    echo "[skip] $method $size seed $seed: $run/result.json exists"
                    continue
                fi
                echo "[stale] $method $size seed $seed: its settings differ from this sweep's, running it again"
            elif [ -f "$run/ckpt.pt" ] && [ "$(cat "$run/command" 2>/dev/null)" = "${args[*]}" ]; then
                resume=(--resume)  # an unfinished run of the same settings: continue it from its checkpoint
            fi
            if [ ${#resume[@]} -eq 0 ]; then
                rm -rf "$run"
                mkdir -p "$run"
                printf '%s' "${args[*]}" > "$run/command"
            else
                rm -f "$run"/*.tmp "$run/failed.json"  # what a failed write or the failed attempt left
            fi
            echo "[run ] $method $size seed $seed: python ${cmd[0]} ${args[*]} ${resume[*]}"
            python "${cmd[0]}" "${args[@]}" "${resume[@]}" > >(tee -a "$run/train.log") 2>&1 &
            child=$!
            wait "$child"
            code=$?
            child=""
            if [ "$code" -ne 0 ]; then
                # the reason: the script's one-line error, the exception's last line, or the signal
                reason=$(tr '\r' '\n' < "$run/train.log" | grep -v '^\s*$' | tail -n 1 | cut -c1-200)
                [ "$code" -ge 128 ] && reason="killed by signal $((code - 128)) ($reason)"
                python -c "import json, sys; json.dump({'method': sys.argv[1], 'size': sys.argv[2], \
'seed': int(sys.argv[3]), 'exit_code': int(sys.argv[4]), 'reason': sys.argv[5]}, open(sys.argv[6], 'w'))" \
                    "$method" "$size" "$seed" "$code" "$reason" "$run/failed.json"
                echo "[fail] $method $size seed $seed: $reason"
                failed=$((failed + 1))
            else
                rm -f "$run/ckpt.pt"  # a finished run's result is what the sweep keeps (tiny: 330 MB a checkpoint)
            fi
        done
    done
done
[ "$DRY" = 1 ] && exit 0
if ! python report.py "$OUT" "${sweep[@]}"; then
    echo "bench: report.py failed, so $OUT/results.md is not this sweep's table" >&2
    exit 1
fi
if [ "$failed" -gt 0 ]; then
    echo "bench: $failed run(s) failed (see failed.json in their folders)" >&2
    exit 1
fi
