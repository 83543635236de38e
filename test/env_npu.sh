#!/usr/bin/env bash
# Ascend NPU environment (CANN). Sourced by the test/*.sh launchers when DEVICE=npu.
# Adjust CANN_HOME to your install; the variables follow the Ascend ModelZoo conventions.
CANN_HOME=${CANN_HOME:-/usr/local/Ascend}
if [ -f "$CANN_HOME/ascend-toolkit/set_env.sh" ]; then
    # shellcheck disable=SC1091
    source "$CANN_HOME/ascend-toolkit/set_env.sh"
else
    echo "env_npu.sh: $CANN_HOME/ascend-toolkit/set_env.sh not found; set CANN_HOME" >&2
fi
export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
export ASCEND_GLOBAL_EVENT_ENABLE=${ASCEND_GLOBAL_EVENT_ENABLE:-0}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
