#!/usr/bin/env bash
# Sweep sizes x methods x seeds and collect perplexity, memory and speed into one table.
#
#   bash bench.sh                        # GPU: 60m 130m 350m (+1b with >= 70 GiB) on C4 at 10% of the papers' steps,
#                                        # T5 tokens, a sequence per document, as the papers (python data.py c4
#                                        # --tokenizer t5 first)
#                                        # CPU: mini on the embedded Shakespeare as UTF-8 bytes (its recipe)
#   bash bench.sh --budget 0.05          # 5% of the papers' steps
#   bash bench.sh --paper                # the papers' full budgets (--budget 1): read the plan's GPU-hours first
#   bash bench.sh --max-steps 20         # a fixed number of steps for every run
#   bash bench.sh --smoke                # GPU smoke sweep: every method at 60m, 100 steps of 128 x 256 tokens
#   bash bench.sh --dry-run              # print the plan and the runs, run nothing
#   SEEDS="0 1 2" bash bench.sh          # several seeds: results.md gives the mean and the spread
#   SIZES="60m 130m" METHODS="full galore" bash bench.sh
#   OUT=results/2026-11-25-cpu bash bench.sh   # resume a sweep: finished runs with the same settings are skipped,
#                                              # unfinished ones (a ckpt.pt, no result.json) continue with --resume
#   LR=1e-2 bash bench.sh                # one learning rate for every method
#   SEQUENCES=documents bash bench.sh    # a sequence per document (the GPU default) or windows (the CPU default)
#   LRS="1e-3 3e-3 1e-2 3e-2" SEEDS=0 bash bench.sh   # the lr sweep (not the default): every row at every lr
#   DEVICES="cuda:0 cuda:1" bash bench.sh              # the queue's devices (default: every GPU, or cpu)
#   SPEED_ROUNDS=0 bash bench.sh         # CPU: no speed pass (default 3 rounds of SPEED_STEPS=60 steps a row)
#
# Every run is `python <script> <its row's flags>`, the script and flags coming from model.py's recipe table
# (`python model.py --bench-command ROWS SIZES`), the same defaults a direct run of the script uses. The papers'
# budgets: 512 sequences x 256 tokens = 131,072 tokens per step, 60m 10K steps (1.3B tokens), 130m 20K (2.6B),
# 350m 60K (7.9B), 1b 100K (13.1B); --budget scales the steps (GPU default 0.1: a 350m run is then 6,000 steps,
# 786M tokens, per method). The CPU default is mini's recipe on shakespeare-bytes, the papers' regime in
# miniature (the matrices are 90% of the parameters): 300 steps of 16 x 256 tokens, with the methods' periods
# (projector refresh, restarts, merges) at 50 steps so that they act. tiny on GPT-2 tokens stays a size:
# SIZES=tiny DATASET=shakespeare bash bench.sh. matplotlib, if
# installed, draws the loss curves and the memory bars (pip install matplotlib, then python report.py OUT).
#
# The runs form a queue over DEVICES, one run per device at a time (every GPU of the node by default; a GPU run
# sees its GPU alone through CUDA_VISIBLE_DEVICES). "cpu" may be listed several times: DEVICES="cpu cpu" runs
# two runs side by side, each with half the cores (OMP_NUM_THREADS, unless it is set; at mini on 2 cores they
# train as many tokens/s in all as one run on both). Runs that share the cores, or follow each other on a machine
# whose load drifts, cannot time the methods against each other, so on CPU the sweep ends with a speed pass:
# every row SPEED_STEPS steps alone on every core, the rows in turn, SPEED_ROUNDS times (into
# $OUT/speed/<row>_<size>_r<round>; 60 steps by default, so that mini's 50-step periods act inside the timed
# steps, the first not being timed); the table's tokens/s and their ratio to full-rank come from it (the median
# over the rounds of the ratio within a round, and its range). With one device a run's
# output shows here and goes to its train.log; with several, to its train.log alone, and a line here says
# when each run starts and ends. A failed run does not stop the others. No run is split over GPUs: each fits
# one by its micro-batch (the recipe's 80 GB one scaled to the GPU's memory; accumulation keeps the global batch),
# and DDP copies the whole model to every GPU, so torchrun over several makes a run faster, not smaller; with
# fewer runs than GPUs, start one yourself: torchrun --nproc_per_node=N train_<method>.py FLAGS.
# Before the first run it prints the
# plan (it asks nothing): per size the runs, tokens and FLOPs (from the shapes: model.bench_plan), and on a GPU of
# model.PEAK_BF16_TFLOPS the GPU-hours at 40% MFU and the least wall time on the queue's GPUs.
#
# The lr sweep (LRS) runs each row at each lr into $OUT/runs/<row>_lr<lr>_<size>_s<seed> (default OUT
# results/<date>-<device>-lr-sweep); report.py then writes $OUT/lr_sweep.md, each row's ppl at every lr and its
# best, and results.md compares the rows at their best lrs. Sweep at one seed, then run each row at its best lr
# over seeds: LR=<its best> METHODS=<the row> SEEDS="0 1 2" bash bench.sh.
#
# Output: $OUT/runs/<row>_<size>_s<seed>/{result.json,log.jsonl,train.log} (or failed.json with the reason, and
# the ckpt.pt a rerun continues from; a finished run's checkpoint is removed), then $OUT/results.md,
# $OUT/results.csv, $OUT/speed.csv (the speed pass, a line per run), $OUT/loss_<size>.png and
# $OUT/memory_<size>.png (report.py), of this sweep's runs alone. A run (of the sweep or of the speed pass)
# whose recorded command differs from this sweep's is stale and runs again; a folder a live run holds locked
# is left alone. SIGTERM or Ctrl-C stops every running training run with SIGTERM (each checkpoints) and then the
# sweep. The exit status is 1 if any run failed or report.py did, 2 if a row of METHODS, an lr of LRS or a
# device of DEVICES is unknown (before any run).
set -uo pipefail
cd "$(dirname "$0")"

BUDGET=${BUDGET:-}
STEPS=""
SMOKE=0
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET="$2"; shift 2 ;;
        --paper) BUDGET=1; shift ;;
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

CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # the cores this process may use (nproc reads those)

# the GPUs this process sees: how many, the first one's memory in GiB and its name
read -r GPUS GPU_MEM GPU_NAME <<< "$(python -c "import torch; n = torch.cuda.device_count(); p = n and \
torch.cuda.get_device_properties(0); print(n, p.total_memory // 2**30 if n else 0, p.name if n else 'cpu')")"
if [ "$GPUS" -gt 0 ]; then
    DEVICE=$(echo "$GPU_NAME" | tr 'A-Z ' 'a-z-')
    DEFAULT_SIZES="60m 130m 350m"
    [ "$GPU_MEM" -ge 70 ] && DEFAULT_SIZES="$DEFAULT_SIZES 1b"
    DEFAULT_DATASET=c4-t5  # the papers' corpus and tokenizer, one sequence per document as theirs
    DEFAULT_SEQUENCES=documents
    BUDGET=${BUDGET:-0.1}
    DEFAULT_DEVICES=$(seq -s ' ' -f 'cuda:%g' 0 $((GPUS - 1)))
else
    DEVICE=cpu
    DEFAULT_SIZES="mini"
    DEFAULT_DATASET=shakespeare-bytes
    DEFAULT_SEQUENCES=windows
    DEFAULT_DEVICES=cpu
fi
EXTRA=()
GLOBAL_BATCH=0  # the recipe's
if [ "$SMOKE" = 1 ]; then  # every method once, quickly, on the embedded corpus: a check, not a benchmark
    DEFAULT_SIZES="60m"
    DEFAULT_DATASET=shakespeare
    DEFAULT_SEQUENCES=windows
    STEPS=${STEPS:-100}
    GLOBAL_BATCH=128
    # one validation, at the end: the sweep's time is training
    EXTRA=(--global-batch "$GLOBAL_BATCH" --eval-every "$STEPS")
    DEVICE="$DEVICE-smoke"
fi
SIZES=${SIZES:-$DEFAULT_SIZES}
DATASET=${DATASET:-$DEFAULT_DATASET}
SEQUENCES=${SEQUENCES:-$DEFAULT_SEQUENCES}
METHODS=${METHODS:-$(python -c "import model; print(' '.join(model.BENCH_ROWS))")}
SEEDS=${SEEDS:-0}
LRS=${LRS:-}
SPEED_ROUNDS=${SPEED_ROUNDS:-3}
SPEED_STEPS=${SPEED_STEPS:-60}
DEVICES=${DEVICES:-$DEFAULT_DEVICES}
OUT=${OUT:-results/$(date +%F)-$DEVICE${LRS:+-lr-sweep}}
SPEED_EXTRA=("${EXTRA[@]}")  # the speed pass's runs: the sweep's flags but its own steps
if [ -n "$STEPS" ]; then
    EXTRA+=(--max-steps "$STEPS")
elif [ -n "$BUDGET" ]; then
    EXTRA+=(--budget "$BUDGET")
fi
[ -n "${LR:-}" ] && EXTRA+=(--lr "$LR") SPEED_EXTRA+=(--lr "$LR")
case "$SEQUENCES" in
    windows) ;;  # the scripts' default: not named, so the commands of earlier sweeps stay the same
    documents) EXTRA+=(--sequences documents) SPEED_EXTRA+=(--sequences documents) ;;
    *) echo "error: SEQUENCES must be windows or documents, got '$SEQUENCES'" >&2; exit 2 ;;
esac
if [ -n "$LRS" ] && [ -n "${LR:-}" ]; then
    echo "error: LR and LRS are both set; LR is one lr for every run, LRS a sweep over several" >&2
    exit 2
fi
for var in SPEED_ROUNDS SPEED_STEPS; do
    if ! [[ ${!var} =~ ^[0-9]+$ ]] || { [ "$var" = SPEED_STEPS ] && [ "${!var}" -lt 2 ]; }; then
        echo "error: $var must be a whole number (SPEED_STEPS at least 2: a run's first step is not timed)," \
            "got '${!var}'" >&2
        exit 2
    fi
done
for lr in $LRS; do  # the lr names the run's folder, so it must stay one parseable word
    if ! [[ $lr =~ ^[0-9]*\.?[0-9]+([eE]-?[0-9]+)?$ ]]; then
        echo "error: LRS: '$lr' is not a number such as 3e-3" >&2
        exit 2
    fi
done
SLOTS=($DEVICES)  # the queue's places: one run on each at a time
CPUS=0
for device in "${SLOTS[@]}"; do
    if [ "$device" = cpu ]; then
        CPUS=$((CPUS + 1))
    elif ! [[ $device =~ ^cuda:[0-9]+$ ]] || [ "${device#cuda:}" -ge "$GPUS" ]; then
        echo "error: DEVICES: '$device' is not cpu or cuda:N with N below this machine's $GPUS GPU(s)" >&2
        exit 2
    fi
done
[ ${#SLOTS[@]} -gt 0 ] || { echo "error: DEVICES is empty" >&2; exit 2; }
# CPU runs side by side share the cores: each gets its part of them (torch reads OMP_NUM_THREADS), unless set
OMP_OURS=0
if [ "$CPUS" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    export OMP_NUM_THREADS=$(( CORES / CPUS > 1 ? CORES / CPUS : 1 )) OMP_OURS=1
fi
IFS=, read -r -a VISIBLE <<< "${CUDA_VISIBLE_DEVICES:-}"  # cuda:N is the Nth GPU this process sees

if [ ! -f "data/$DATASET/meta.json" ] && ! python -c "import data, sys; sys.exit(sys.argv[1] not in data.EMBEDDED)" \
        "$DATASET"; then  # the embedded datasets are prepared on first use
    prepare=$(python -c "import data, sys; print(data.prepare_command(sys.argv[1]))" "$DATASET")
    if [ "$DRY" = 1 ]; then  # the plan needs the vocabulary alone, which the dataset's name gives
        echo "note: dataset '$DATASET' is not prepared yet; before the runs: $prepare"
    else
        echo "error: dataset '$DATASET' is not prepared; run: $prepare (or DATASET=shakespeare-bytes)" >&2
        exit 1
    fi
fi

declare -A COMMAND  # every row of the sweep, checked before the first run: a typo in METHODS runs nothing
RUNS=$(( $(wc -w <<< "$SEEDS") * $(wc -w <<< "${LRS:--}") ))  # per row and size
GPU_SLOTS=$((${#SLOTS[@]} - CPUS)) PLAN_GPU=cpu
[ "$GPU_SLOTS" -gt 0 ] && PLAN_GPU=$GPU_NAME
commands=$(python model.py --bench-command "$METHODS" "$SIZES" \
    --plan "$RUNS" "${STEPS:-0}" "${BUDGET:-1}" "$GLOBAL_BATCH" "$PLAN_GPU" "$GPU_SLOTS" "$DATASET") || exit 2
PLAN=()  # runs, tokens, FLOPs and time per size, printed before the first run
while read -r size method command; do
    if [ "$size" = plan ]; then PLAN+=("plan: $method $command"); continue; fi
    COMMAND[$method,$size]=$command
done <<< "$commands"

# SIGTERM or Ctrl-C: every running training run gets SIGTERM (it checkpoints and exits; a run started in the
# background ignores SIGINT), and the sweep stops when they have
declare -A SLOT_OF=() RUN_OF=() WHAT_OF=() START_OF=()  # per running run's pid: its place, folder, name, start
BUSY=()  # per place: the pid of its run, empty when free
stop() {
    trap - TERM INT
    for pid in "${!SLOT_OF[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${!SLOT_OF[@]}"; do wait "$pid"; done
    echo "bench: stopped by SIG$1; run the same command again to resume the sweep" >&2
    exit $((128 + $(kill -l "$1")))
}
trap 'stop TERM' TERM
trap 'stop INT' INT

in_use() {  # whether a training run holds the lock of folder $1 (a live run: never delete it)
    [ -f "$1/.lock" ] && ! python -c "import fcntl, sys; fcntl.flock(open(sys.argv[1]), fcntl.LOCK_EX | fcntl.LOCK_NB)" \
        "$1/.lock" 2>/dev/null
}

reap() {  # wait for one running run to end, then record its end: failed.json with the reason, or its result kept
    local pid code run what reason
    wait -n -p pid "${!SLOT_OF[@]}"
    code=$?
    run=${RUN_OF[$pid]} what=${WHAT_OF[$pid]}
    BUSY[${SLOT_OF[$pid]}]=""
    if [ "$code" -ne 0 ]; then
        # the reason: the script's one-line error, the exception's last line, or the signal
        reason=$(tr '\r' '\n' < "$run/train.log" | grep -v '^\s*$' | tail -n 1 | cut -c1-200)
        [ "$code" -ge 128 ] && reason="killed by signal $((code - 128)) ($reason)"
        python -c "import json, sys; json.dump({'run': sys.argv[1], 'exit_code': int(sys.argv[2]), \
'reason': sys.argv[3]}, open(sys.argv[4], 'w'))" "$what" "$code" "$reason" "$run/failed.json"
        echo "[fail] $what: $reason"
        failed=$((failed + 1))
    else
        rm -f "$run/ckpt.pt"  # a finished run's result is what the sweep keeps (tiny: 330 MB a checkpoint)
        echo "[done] $what in $((SECONDS - START_OF[$pid]))s"
    fi
    unset "SLOT_OF[$pid]" "RUN_OF[$pid]" "WHAT_OF[$pid]" "START_OF[$pid]"
}

free_slot() {  # SLOT: a free place of the queue, once a running run has ended if none is
    while true; do
        for SLOT in "${!SLOTS[@]}"; do
            [ -z "${BUSY[$SLOT]:-}" ] && return
        done
        reap
    done
}

launch() {  # run folder $1, named $2, as `python $3...` on place SLOT of the queue
    local run=$1 what=$2 device=${SLOTS[$SLOT]}
    shift 2
    local visible=""  # a GPU run sees its GPU alone, as cuda:0; a CPU run sees none
    [ "$device" != cpu ] && visible=${VISIBLE[${device#cuda:}]:-${device#cuda:}}
    echo "[run ] $what on $device: python $*"
    if [ ${#SLOTS[@]} -eq 1 ]; then  # one run at a time: it shows its progress here too
        CUDA_VISIBLE_DEVICES=$visible python "$@" > >(tee -a "$run/train.log") 2>&1 &
    else
        CUDA_VISIBLE_DEVICES=$visible python "$@" >> "$run/train.log" 2>&1 &
    fi
    BUSY[$SLOT]=$!
    SLOT_OF[$!]=$SLOT RUN_OF[$!]=$run WHAT_OF[$!]=$what START_OF[$!]=$SECONDS
}

queue() {  # run folder $1, named $2, as `python $3...` when a place of the queue is free (or skipped: its result)
    local run=$1 what=$2 script=$3 resume=()
    shift 3
    if in_use "$run"; then
        echo "[busy] $what: a run is using $run; left alone"
        return
    fi
    if [ -f "$run/result.json" ]; then
        # the script records its own command line: the same one means the same run
        # (a resumed run records its --resume)
        if python -c "import json, sys; sys.exit([a for a in json.load(open(sys.argv[1]))['argv'] if a != '--resume'] \
!= sys.argv[2:])" "$run/result.json" "$@"; then
            echo "[skip] $what: $run/result.json exists"
            return
        fi
        echo "[stale] $what: its settings differ from this sweep's, running it again"
    elif [ -f "$run/ckpt.pt" ] && [ "$(cat "$run/command" 2>/dev/null)" = "$*" ]; then
        resume=(--resume)  # an unfinished run of the same settings: continue it from its checkpoint
    fi
    free_slot  # the folder is prepared when its run can start
    if [ ${#resume[@]} -eq 0 ]; then
        rm -rf "$run"
        mkdir -p "$run"
        printf '%s' "$*" > "$run/command"
    else
        rm -f "$run"/*.tmp "$run/failed.json"  # what a failed write or the failed attempt left
    fi
    launch "$run" "$what" "$script" "$@" "${resume[@]}"
}

[ "$DRY" = 1 ] || mkdir -p "$OUT/runs"
echo "bench: sizes [$SIZES] methods [$METHODS] seeds [$SEEDS]${LRS:+ lrs [$LRS]} on $DEVICE [$DEVICES]," \
    "dataset $DATASET -> $OUT"
printf '%s\n' "${PLAN[@]}"
failed=0
sweep=()  # this sweep's run folders: the table holds them alone
for size in $SIZES; do
    for method in $METHODS; do
        read -r -a cmd <<< "${COMMAND[$method,$size]}"
        for lr in ${LRS:--}; do  # "-": the row's own lr
            for seed in $SEEDS; do
                name=$method lr_flag=() what="$method $size seed $seed"
                if [ "$lr" != - ]; then
                    name=${method}_lr$lr lr_flag=(--lr "$lr") what="$method lr $lr $size seed $seed"
                fi
                run="$OUT/runs/${name}_${size}_s${seed}"
                args=("${cmd[@]:1}" --size "$size" --dataset "$DATASET" --seed "$seed" "${EXTRA[@]}" "${lr_flag[@]}"
                      --out-dir "$run")
                if [ "$DRY" = 1 ]; then echo "python ${cmd[0]} ${args[*]}"; continue; fi
                sweep+=("$run")
                queue "$run" "$what" "${cmd[0]}" "${args[@]}"
            done
        done
    done
done
while [ ${#SLOT_OF[@]} -gt 0 ]; do reap; done

# tokens/s side by side: CPU runs of the sweep share the cores, and two runs of a sequential sweep see different
# loads, so on CPU each row then runs SPEED_STEPS steps alone on every core, the rows in turn, SPEED_ROUNDS
# times; report.py gives each row's tokens/s over full-rank's in the same round (median and range over rounds)
speed=()
if [ "$SPEED_ROUNDS" -gt 0 ] && [ "$GPU_SLOTS" -eq 0 ] && [ -z "$LRS" ]; then
    SLOTS=(cpu)
    [ "$OMP_OURS" = 1 ] && export OMP_NUM_THREADS=$CORES
    read -r seed _ <<< "$SEEDS"
    if [ "$DRY" = 1 ]; then
        echo "speed: then $SPEED_ROUNDS round(s) of every row, $SPEED_STEPS steps each, one run at a time on every core"
        exit 0
    fi
    for round in $(seq 1 "$SPEED_ROUNDS"); do
        for size in $SIZES; do
            for method in $METHODS; do
                read -r -a cmd <<< "${COMMAND[$method,$size]}"
                run="$OUT/speed/${method}_${size}_r$round"
                args=("${cmd[@]:1}" --size "$size" --dataset "$DATASET" --seed "$seed" "${SPEED_EXTRA[@]}"
                      --max-steps "$SPEED_STEPS" --eval-every "$SPEED_STEPS" --out-dir "$run")
                speed+=("$run")
                queue "$run" "$method $size speed round $round" "${cmd[0]}" "${args[@]}"
            done
        done
    done
    while [ ${#SLOT_OF[@]} -gt 0 ]; do reap; done
fi
[ "$DRY" = 1 ] && exit 0
if ! python report.py "$OUT" "${sweep[@]}" "${speed[@]}"; then
    echo "bench: report.py failed, so $OUT/results.md is not this sweep's table" >&2
    exit 1
fi
if [ "$failed" -gt 0 ]; then
    echo "bench: $failed run(s) failed (see failed.json in their folders)" >&2
    exit 1
fi
