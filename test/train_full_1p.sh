#!/usr/bin/env bash
# Full training on one device.
#   bash test/train_full_1p.sh --data_path=/train_tmp/ms1m-retinaface-t1
#   bash test/train_full_1p.sh --config=configs/ms1mv3_mbf.py --data_path=/train_tmp/ms1m-retinaface-t1
#   DEVICE=cpu bash test/train_full_1p.sh
# Output: test/output/train_full_1p/<config stem>/work/, its log in work/logs/ (see test/common.sh for every option).
NPROC=${NPROC:-1}
source "$(dirname "$0")/common.sh"
run_training train_full_1p
