#!/usr/bin/env bash
# Shared by train_full_8p.sh, train_full_1p.sh and train_performance_8p.sh (Ascend ModelZoo style).
# Environment: DEVICE (npu|cuda|cpu|auto), NPROC, CONFIG, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
# Arguments: --data_path=DIR (sets cfg.rec), any other --key=value is passed as --set key=value.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

DEVICE=${DEVICE:-npu}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${CONFIG:-}" ]; then
    if [ "$DEVICE" = cpu ]; then CONFIG=configs/demo_cpu.py; else CONFIG=configs/ms1mv3_r50.py; fi
fi
overrides=(--set "device='$DEVICE'")
for arg in "$@"; do
    case "$arg" in
        --data_path=*) overrides+=(--set "rec='${arg#--data_path=}'") ;;
        --*=*) key=${arg%%=*}; overrides+=(--set "${key#--}=${arg#*=}") ;;
        *) echo "$(basename "$0"): unknown argument '$arg' (expected --data_path=DIR or --key=value)" >&2; exit 2 ;;
    esac
done
if [ "$DEVICE" = npu ]; then
    # shellcheck disable=SC1091
    source "$repo_root/test/env_npu.sh"
fi

run_training() {  # $1 = job name; remaining: extra --set arguments
    local name=$1; shift
    local out_dir="$repo_root/test/output/$name"
    mkdir -p "$out_dir"
    local log="$out_dir/train_${NODE_RANK}.log"
    echo "$name: config $CONFIG, device $DEVICE, $NPROC process(es) x $NNODES node(s); log: $log"
    local start=$(date +%s)
    set +e
    torchrun --nproc_per_node="$NPROC" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
        --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
        train.py "$CONFIG" "${overrides[@]}" --set "output='$out_dir/work'" "$@" > "$log" 2>&1
    local status=$?
    set -e
    local end=$(date +%s)
    echo "E2E Training Duration sec : $((end - start))"
    local fps
    fps=$(grep -o '[0-9.]* samples/s' "$log" | tail -n 5 | awk '{s += $1; n += 1} END {if (n) printf "%.2f", s / n}')
    echo "Final Performance images/sec : ${fps:-n/a}"
    grep -E 'Accuracy-Flip|Accuracy-Highest' "$log" | tail -n 6 || true
    if [ $status -ne 0 ]; then
        echo "$name: training failed with exit code $status; last lines of $log:" >&2
        tail -n 20 "$log" >&2
    fi
    return $status
}
