#!/usr/bin/env bash
# Throughput run: a fixed number of steps (PERF_STEPS, default 500) on 8 devices, then prints FPS.
#   bash test/train_performance_8p.sh --data_path=/train_tmp/ms1m-retinaface-t1
#   DEVICE=cpu NPROC=2 PERF_STEPS=20 bash test/train_performance_8p.sh --rec=random --network=mbf
# Output: test/output/train_performance_8p/<config stem>/ (see test/common.sh for every option).
NPROC=${NPROC:-8}
PERF_STEPS=${PERF_STEPS:-500}
source "$(dirname "$0")/common.sh"
run_training train_performance_8p --set "max_steps=$PERF_STEPS" --set "frequent=10" --set "val_targets=[]" --set "verbose=0"
