#!/usr/bin/env bash
# Sweep sizes x methods and collect perplexity, memory and speed into one table.
#
#   bash bench.sh                                  # GPU: 60m 130m 350m (+1b with >= 70 GiB) on C4; CPU: tiny
#   bash bench.sh --budget 0.05                    # 5% of the papers' steps
#   SIZES="60m 130m" METHODS="full galore" bash bench.sh
#   OUT=results/2026-11-25-cpu bash bench.sh       # resume that sweep: finished runs are skipped
#   LR=1e-2 bash bench.sh                          # one learning rate for every method
#
# Budgets, as GaLore/Fira/Glentis et al. train: 512 sequences x 256 tokens = 131,072 tokens per step,
#   60m 10K steps (1.3B tokens), 130m 20K (2.6B), 350m 60K (7.9B), 1b 100K (13.1B),
# which the papers quote as 1.1B / 2.2B / 6.4B / 13.1B tokens. --budget scales the steps (GPU default
# 0.1: a 350m run is then 6,000 steps, 786M tokens, per method). Warmup is 10% of the steps,
# each method runs at its paper's learning rate (or LR), and the projector / refactorization period is the
# papers' T = 200 steps (scaled down with the CPU budget so that it still acts).
#
# The CPU default (no GPU): `tiny` on the embedded Shakespeare corpus, CPU_STEPS=100 steps of 8 x 256
# tokens per method, about 15 minutes for the 5 runs on 2 cores.
#
# Output: $OUT/runs/<method>_<size>/{result.json,log.jsonl,train.log} (or failed.json with the reason),
# then $OUT/results.md, $OUT/results.csv and $OUT/loss_<size>.png (report.py).
set -uo pipefail
cd "$(dirname "$0")"

BUDGET=${BUDGET:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET="$2"; shift 2 ;;
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
    DATASET=${DATASET:-c4}
    BUDGET=${BUDGET:-0.1}
    DEFAULT_SIZES="60m 130m 350m"
    [ "$GPU_MEM" -ge 70 ] && DEFAULT_SIZES="$DEFAULT_SIZES 1b"
    GAP=200
else
    DEVICE=cpu
    DATASET=${DATASET:-shakespeare}
    DEFAULT_SIZES="tiny"
    GAP=25
fi
SIZES=${SIZES:-$DEFAULT_SIZES}
METHODS=${METHODS:-full galore fira lowrank lowrank_refactor}
OUT=${OUT:-results/$(date +%F)-$DEVICE}

if [ "$DATASET" != shakespeare ] && [ ! -f "data/$DATASET/val.bin" ]; then
    echo "error: dataset '$DATASET' is not prepared; run: python data.py $DATASET (or DATASET=shakespeare)" >&2
    exit 1
fi

# steps and per-GPU micro-batch per size (the micro-batches fit an 80 GB GPU in bf16); 512 sequences a step
steps_and_batch() {
    case "$1" in
        60m) echo 10000 128 ;;
        130m) echo 20000 64 ;;
        350m) echo 60000 64 ;;
        1b) echo 100000 16 ;;
        7b) echo 150000 4 ;;
        *) echo "" ;;
    esac
}

script_and_args() {
    case "$1" in
        full) echo "train_full.py" ;;
        galore) echo "train_galore.py --update-proj-gap $GAP" ;;
        fira) echo "train_fira.py --update-proj-gap $GAP" ;;
        lowrank) echo "train_lowrank_refactor.py --refactor-every 0 --momentum-reset-every 0" ;;
        lowrank_refactor) echo "train_lowrank_refactor.py --refactor-every $GAP" ;;
        *) echo "" ;;
    esac
}

mkdir -p "$OUT/runs"
echo "bench: sizes [$SIZES] methods [$METHODS] on $DEVICE, dataset $DATASET -> $OUT"
for size in $SIZES; do
    if [ "$DEVICE" = cpu ]; then
        budget_args="--max-steps ${CPU_STEPS:-100} --batch-size 8 --eval-every 1000 --log-every 5"
    else
        read -r steps batch <<< "$(steps_and_batch "$size")"
        if [ -z "$steps" ]; then echo "error: no GPU budget for size '$size'" >&2; exit 2; fi
        steps=$(python -c "print(max(1, round($steps * $BUDGET)))")
        budget_args="--max-steps $steps --batch-size $batch --grad-accum $((512 / batch)) \
            --eval-every $(( steps / 10 > 0 ? steps / 10 : 1 )) --val-tokens 1048576"
    fi
    for method in $METHODS; do
        run="$OUT/runs/${method}_$size"
        cmd=$(script_and_args "$method")
        if [ -z "$cmd" ]; then echo "error: unknown method '$method'" >&2; exit 2; fi
        if [ -f "$run/result.json" ]; then echo "[skip] $method $size: $run/result.json exists"; continue; fi
        mkdir -p "$run"
        rm -f "$run/failed.json"
        echo "[run ] $method $size: python $cmd --size $size --dataset $DATASET $(echo $budget_args ${LR:+--lr $LR})"
        # shellcheck disable=SC2086
        python $cmd --size "$size" --dataset "$DATASET" $budget_args ${LR:+--lr $LR} --out-dir "$run" 2>&1 \
            | tee "$run/train.log"
        code=${PIPESTATUS[0]}
        if [ "$code" -ne 0 ]; then
            # the reason: the script's one-line error, the exception's last line, or the signal
            reason=$(tr '\r' '\n' < "$run/train.log" | grep -v '^\s*$' | tail -n 1 | cut -c1-200)
            [ "$code" -ge 128 ] && reason="killed by signal $((code - 128)) ($reason)"
            python -c "import json, sys; json.dump({'method': sys.argv[1], 'size': sys.argv[2], \
'exit_code': int(sys.argv[3]), 'reason': sys.argv[4]}, open(sys.argv[5], 'w'))" \
                "$method" "$size" "$code" "$reason" "$run/failed.json"
            echo "[fail] $method $size: $reason"
        fi
    done
done
python report.py "$OUT"
