#!/usr/bin/env bash
# Full training on 8 devices per node (multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT).
#   bash test/train_full_8p.sh --data_path=/train_tmp/ms1m-retinaface-t1
#   bash test/train_full_8p.sh --config=configs/ms1mv3_mbf.py --data_path=/train_tmp/ms1m-retinaface-t1
#   DEVICE=cpu NPROC=2 bash test/train_full_8p.sh          # the CPU demo on 2 processes
# Output: test/output/train_full_8p/<config stem>/work/, its log in work/logs/ (see test/common.sh for every option).
NPROC=${NPROC:-8}
source "$(dirname "$0")/common.sh"
run_training train_full_8p
