#!/usr/bin/env bash
# Shared by train_full_8p.sh, train_full_1p.sh and train_performance_8p.sh (Ascend ModelZoo style).
# Environment: DEVICE (npu|cuda|cpu|auto), NPROC, CONFIG, RUN_NAME, NNODES, NODE_RANK, MASTER_ADDR,
#              MASTER_PORT, PYTHON, OUTPUT_ROOT (default test/output), DRY_RUN=1 (print the training
#              command instead of running it).
# Arguments:   --config=FILE (same as CONFIG), --data_path=DIR (sets cfg.rec), --output=DIR (run folder),
#              --amp_cfg=True|False and --opt_level=O0|O1|O2|O3 (apex flags -> one fp16 setting),
#              --socket_ifname=NAME (the network interface of several nodes: HCCL_SOCKET_IFNAME,
#              NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME), --hccl_if_ip=IP (HCCL_IF_IP); any other --key=value
#              is passed to train.py as --set key=value. HCCL_IF_IP, HCCL_SOCKET_IFNAME, NCCL_*/GLOO_* variables
#              and ModelZoo's ASCEND_DEVICE_ID / RANK_SIZE already in the environment pass through to train.py.
# Output:      the run folder is $OUTPUT_ROOT/<script>/<config stem>[-RUN_NAME]/work/ (or --output=DIR), so runs
#              of different configs never prune each other's checkpoints; each launch logs to
#              <run folder>/logs/train_<node rank>_<YYYYmmdd-HHMMSS>.log, a new file every time (-2, -3... when
#              the name is taken), so a re-run, even a refused one, never overwrites an earlier run's log.
#              The performance script gives each one-node run a folder of its own (run_training below).
set -euo pipefail
caller_dir=$PWD  # relative paths in arguments are the caller's, not the repository root's
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
script_name=$(basename "$0")

from_caller() {  # absolute form of a path given relative to the caller's folder
    case "$1" in /*) echo "$1" ;; *) echo "$caller_dir/$1" ;; esac
}

launcher_error() {  # one line on stderr, exit 2 (the trainer's code for bad input)
    echo "$script_name: error: $*" >&2
    exit 2
}

DEVICE=${DEVICE:-npu}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
OUTPUT_ROOT=$(from_caller "${OUTPUT_ROOT:-$repo_root/test/output}")
data_path=""
output=""
overrides=(--set "device='$DEVICE'")
user_keys=" "
amp_cfg=""
opt_level=""
amp_at=""  # where the first apex flag stood among the overrides: fp16 goes there, so a later --fp16= still wins
for arg in "$@"; do
    case "$arg" in
        --config=*) CONFIG=${arg#--config=} ;;
        --data_path=*) data_path=$(from_caller "${arg#--data_path=}") ;;
        --output=*) output=$(from_caller "${arg#--output=}") ;;
        --amp_cfg=*)
            case "${arg#--amp_cfg=}" in
                True|true|1) amp_cfg=True ;;
                False|false|0) amp_cfg=False ;;
                *) launcher_error "--amp_cfg=${arg#--amp_cfg=}: expected True or False" ;;
            esac
            amp_at=${amp_at:-${#overrides[@]}} ;;
        --opt_level=*)
            case "${arg#--opt_level=}" in
                O0|O1|O2|O3) opt_level=${arg#--opt_level=} ;;
                *) launcher_error "--opt_level=${arg#--opt_level=}: expected O0, O1, O2 or O3" ;;
            esac
            amp_at=${amp_at:-${#overrides[@]}} ;;
        --socket_ifname=*)
            [ -n "${arg#--socket_ifname=}" ] || launcher_error "--socket_ifname= needs an interface name, e.g. eth0"
            export HCCL_SOCKET_IFNAME=${arg#--socket_ifname=} NCCL_SOCKET_IFNAME=${arg#--socket_ifname=} \
                   GLOO_SOCKET_IFNAME=${arg#--socket_ifname=} ;;
        --hccl_if_ip=*)
            [ -n "${arg#--hccl_if_ip=}" ] || launcher_error "--hccl_if_ip= needs this node's IP address"
            export HCCL_IF_IP=${arg#--hccl_if_ip=} ;;
        --*=*) key=${arg%%=*}; key=${key#--}; user_keys+="$key "; overrides+=(--set "$key=${arg#*=}") ;;
        *) echo "$script_name: unknown argument '$arg' (expected --data_path=DIR or --key=value)" >&2; exit 2 ;;
    esac
done
if [ -n "$amp_at" ]; then
    # apex's two flags are one setting here, fp16 autocast + loss scaling (docs/training.md, Mixed precision):
    # on unless --amp_cfg=False or --opt_level=O0; a missing flag is apex's "on" (amp_cfg) or "O1".
    fp16=True
    if [ "$amp_cfg" = False ] || [ "$opt_level" = O0 ]; then fp16=False; fi
    overrides=("${overrides[@]:0:amp_at}" --set "fp16=$fp16" "${overrides[@]:amp_at}")
fi

if [ -z "${CONFIG:-}" ]; then
    if [ "$DEVICE" = cpu ]; then CONFIG=configs/demo_cpu.py; else CONFIG=configs/ms1mv3_r50.py; fi
fi
# A config path is the caller's when it exists there, else the repository's (configs/<name>.py).
if [ -f "$(from_caller "$CONFIG")" ]; then CONFIG=$(from_caller "$CONFIG"); fi
[ -f "$CONFIG" ] || launcher_error "config file '$CONFIG' not found (set CONFIG=... or pass --config=configs/<name>.py)"
if [ -n "$data_path" ]; then
    [ -d "$data_path" ] || launcher_error "--data_path=$data_path is not a folder, expected a folder with train.rec/train.idx or root/<identity>/<image> files"
    data_path=$(cd "$data_path" && pwd)
    # An explicit data folder replaces a config's generated synthetic identity set.
    overrides+=(--set "rec='$data_path'" --set "synthetic.num_identities=0")
    if [ "$(basename "$CONFIG")" = demo_cpu.py ] && [[ "$user_keys" != *" val_targets "* ]]; then
        # The demo verifies on its generated pairs, which a real data folder does not have.
        echo "$script_name: training the demo config on $data_path; val_targets=[] (pass --val_targets=\"['lfw']\" to verify)"
        overrides+=(--set "val_targets=[]")
    fi
fi
if [ "$DEVICE" = npu ] && [ -z "${DRY_RUN:-}" ]; then
    # shellcheck disable=SC1091
    source "$repo_root/test/env_npu.sh"
fi

first_error_line() {  # the most telling line of a failed run's log
    local log=$1 line
    # The trainer's own errors: "error: ..." (printed or logged as "... ERROR error: ...").
    line=$(grep -m 1 -E '(^|[] ])error: ' "$log" || true)
    [ -z "$line" ] || line="error: ${line#*error: }"  # without the log line's time/rank prefix
    if [ -z "$line" ]; then  # a Python exception: its "SomethingError: message" line
        line=$(grep -E '^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt)(: |$)' "$log" | grep -v ChildFailedError \
               | head -n 1 || true)
    fi
    [ -n "$line" ] || line=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 || true)
    echo "${line:-(the log is empty)}"
}

claim_new() {  # $1 = path without suffix, $2 = suffix, $3 = dir|file: prints the first of $1$2, $1-2$2,
    # $1-3$2... that does not exist and creates it (mkdir / noclobber: atomic, so two launches in the same
    # second get two names). Under DRY_RUN it only prints the name.
    local base=$1 suffix=$2 kind=$3 n=1 path
    while :; do
        path=$base$suffix
        [ $n -eq 1 ] || path=$base-$n$suffix
        if [ -n "${DRY_RUN:-}" ]; then
            [ -e "$path" ] || break
        elif [ "$kind" = dir ]; then
            mkdir "$path" 2>/dev/null && break
        else
            (set -C; : > "$path") 2>/dev/null && break
        fi
        [ -e "$path" ] || launcher_error "cannot create $path"
        n=$((n + 1))
    done
    echo "$path"
}

run_training() {  # $1 = job name; then --folder-per-run (the performance script); remaining: extra --set arguments
    local name=$1; shift
    local folder_per_run=""
    if [ "${1:-}" = --folder-per-run ]; then folder_per_run=1; shift; fi
    local run_name stamp error
    run_name=$(basename "$CONFIG" .py)${RUN_NAME:+-$RUN_NAME}
    stamp=$(date +%Y%m%d-%H%M%S)
    local out_dir="$OUTPUT_ROOT/$name/$run_name"
    if [ -n "$folder_per_run" ] && [ -z "$output" ]; then
        if [ "$NNODES" = 1 ]; then  # re-running a throughput script is the normal case: a new folder each time
            if [ -z "${DRY_RUN:-}" ]; then
                error=$(mkdir -p "$OUTPUT_ROOT/$name" 2>&1) || launcher_error "cannot create $OUTPUT_ROOT/$name: ${error##*: }"
            fi
            out_dir=$(claim_new "$out_dir-$stamp" "" dir) || exit 2
        elif [[ "$user_keys" != *" overwrite "* ]]; then  # every node must name the same folder (clocks differ)
            echo "$name: $NNODES nodes: reusing $out_dir/work with overwrite=True (the previous performance run's" \
                 "checkpoints there are deleted; set RUN_NAME=... to keep runs apart)"
            overrides=("${overrides[@]:0:2}" --set "overwrite=True" "${overrides[@]:2}")  # after device, before the user's
        fi
    fi
    local work_dir=${output:-$out_dir/work}
    local log_dir="$work_dir/logs"
    if [ -z "${DRY_RUN:-}" ]; then
        error=$(mkdir -p "$log_dir" 2>&1) || launcher_error "cannot create $log_dir: ${error##*: }"
    fi
    local log
    log=$(claim_new "$log_dir/train_${NODE_RANK}_$stamp" .log file) || exit 2
    local command=("$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" --nnodes="$NNODES"
                   --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT"
                   train.py "$CONFIG" "${overrides[@]}" --set "output='$work_dir'" "$@")
    echo "$name: config $CONFIG, device $DEVICE, $NPROC process(es) x $NNODES node(s)"
    echo "$name: output: $work_dir; log: $log"
    if [ -n "${DRY_RUN:-}" ]; then
        printf '%q ' "${command[@]}"; echo
        return 0
    fi
    local start end status fps
    start=$(date +%s)
    set +e
    "${command[@]}" > "$log" 2>&1
    status=$?
    set -e
    end=$(date +%s)
    echo "E2E Training Duration sec : $((end - start))"
    # `|| true`: no match (a run that died before its first log line) must not end the script here.
    fps=$(grep -o '[0-9.]* samples/s' "$log" | tail -n 5 | awk '{s += $1; n += 1} END {if (n) printf "%.2f", s / n}' || true)
    echo "Final Performance images/sec : ${fps:-n/a}"
    grep -E 'Accuracy-Flip|Accuracy-Highest' "$log" | tail -n 6 || true
    if [ $status -ne 0 ]; then
        {
            echo "$name: training failed with exit code $status: $(first_error_line "$log")"
            echo "$name: full log: $log; last lines:"
            tail -n 20 "$log"
        } >&2
        return $status
    fi
    echo "$name: done; model: $work_dir/model.pt"
}
