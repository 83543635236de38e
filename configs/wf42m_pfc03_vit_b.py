"""CosFace ViT-B with Partial FC r=0.3 on WebFace42M (mirrors arcface_torch's configs/wf42m_pfc03_vit_b.py).

AdamW, lr 0.001 for the global batch of 8 GPUs x 256, weight decay 0.1, 40 epochs with 4 of warmup,
fp16. Sets only what differs from configs/base.py.
"""
from easydict import EasyDict as edict

config = edict()
config.network = "vit_b_dp005_mask_005"
config.rec = "/train_tmp/WebFace42M"  # folder with train.rec / train.idx / property and the val .bin files
config.num_classes = 2059906
config.num_image = 42474557
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.sample_rate = 0.3
config.fp16 = True
config.optimizer = "adamw"
config.batch_size = 256        # per GPU
config.lr = 0.001                # for the global batch of 8 GPUs x batch_size (use lr_per_512 to rescale)
config.weight_decay = 0.1
config.num_epoch = 40
config.warmup_epoch = 4
config.val_targets = []
