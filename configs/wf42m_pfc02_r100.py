"""CosFace iresnet100 with Partial FC r=0.2 on WebFace42M (mirrors arcface_torch's configs/wf42m_pfc02_r100.py).

lr 0.1 for the global batch of 8 GPUs x 128, SGD momentum 0.9, weight decay 5e-4, 20 epochs, fp16.
Sets only what differs from configs/base.py.
"""
from easydict import EasyDict as edict

config = edict()
config.network = "r100"
config.rec = "/train_tmp/WebFace42M"  # folder with train.rec / train.idx / property and the val .bin files
config.num_classes = 2059906
config.num_image = 42474557
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.sample_rate = 0.2
config.fp16 = True
config.lr = 0.1                # for the global batch of 8 GPUs x batch_size (use lr_per_512 to rescale)
config.val_targets = []
