"""CosFace iresnet100 on Glint360K, 4 nodes x 8 GPUs (32 ranks).

Launch on every node (R = 0..3):
    torchrun --nproc_per_node=8 --nnodes=4 --node_rank=R --master_addr=HOST0 --master_port=29500 \
        train.py configs/glint360k_r100_32p.py
The lr is given per 512 global samples, so the same file stays right on 8 or 16 GPUs. SGD momentum 0.9,
weight decay 5e-4, 20 epochs and verification every 2000 steps are configs/base.py's defaults.
"""
from easydict import EasyDict as edict

config = edict()
config.network = "r100"
config.rec = "/train_tmp/glint360k"
config.num_classes = 360232
config.num_image = 17091657
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.fp16 = True
config.batch_size = 128              # per GPU: global batch 4096 on 32 GPUs
config.lr_per_512 = 0.05             # = 0.4 at 4096, the linear scaling of arcface_torch's 0.1 @ 1024
config.warmup_epoch = 1              # large-batch runs need a short warmup
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
