#!/usr/bin/env bash
# Ascend NPU environment (CANN). Sourced by the test/*.sh launchers when DEVICE=npu.
# CANN's folder: CANN_HOME, else the Install_Path that CANN's installer recorded in
# /etc/Ascend/ascend_cann_install.info, else /usr/local/Ascend. Its set_env.sh is the toolkit's
# (ascend-toolkit/set_env.sh) or, where only the runtime package is installed, nnae/set_env.sh, the
# same order as the Ascend ModelZoo scripts use. The other variables follow the ModelZoo conventions.
if [ -z "${CANN_HOME:-}" ] && [ -f /etc/Ascend/ascend_cann_install.info ]; then
    CANN_HOME=$(sed -n 's/^Install_Path=//p' /etc/Ascend/ascend_cann_install.info | head -n 1)
fi
CANN_HOME=${CANN_HOME:-/usr/local/Ascend}
cann_set_env=""
for candidate in "$CANN_HOME/ascend-toolkit/set_env.sh" "$CANN_HOME/nnae/set_env.sh"; do
    if [ -f "$candidate" ]; then
        cann_set_env=$candidate
        break
    fi
done
if [ -n "$cann_set_env" ]; then
    # CANN's script appends to variables that are often unset (LD_LIBRARY_PATH, PYTHONPATH, ...) and may
    # end with a non-zero status; the launchers run under `set -eu`, which would stop them right here.
    caller_flags=$-
    set +eu
    # shellcheck disable=SC1090
    source "$cann_set_env"
    case $caller_flags in *e*) set -e ;; esac
    case $caller_flags in *u*) set -u ;; esac
    echo "env_npu.sh: sourced $cann_set_env"
else
    echo "env_npu.sh: no CANN set_env.sh under $CANN_HOME (looked for ascend-toolkit/set_env.sh and" \
         "nnae/set_env.sh); set CANN_HOME" >&2
fi
export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
export ASCEND_GLOBAL_EVENT_ENABLE=${ASCEND_GLOBAL_EVENT_ENABLE:-0}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
