#!/usr/bin/env bash
# Throughput run: a fixed number of steps (PERF_STEPS, default 500) on 8 devices, then prints FPS.
#   bash test/train_performance_8p.sh --data_path=/train_tmp/ms1m-retinaface-t1
#   DEVICE=cpu NPROC=2 PERF_STEPS=20 bash test/train_performance_8p.sh --rec=random --network=mbf
# Output: test/output/train_performance_8p/<config stem>-<YYYYmmdd-HHMMSS>/work/, a new folder for each run on one
# node; with NNODES>1 every run reuses <config stem>/work/ with overwrite=True (RUN_NAME=... keeps runs apart).
# The log is in work/logs/ (see test/common.sh for every option).
NPROC=${NPROC:-8}
PERF_STEPS=${PERF_STEPS:-500}
source "$(dirname "$0")/common.sh"
run_training train_performance_8p --folder-per-run --set "max_steps=$PERF_STEPS" --set "frequent=10" --set "val_targets=[]" --set "verbose=0"
