"""ArcFace iresnet50 on MS1MV3 (mirrors arcface_torch's configs/ms1mv3_r50.py).

lr 0.1 for the global batch of 8 GPUs x 128, SGD momentum 0.9, weight decay 5e-4, 20 epochs, fp16.
Sets only what differs from configs/base.py.
"""
from easydict import EasyDict as edict

config = edict()
config.network = "r50"
config.rec = "/train_tmp/ms1m-retinaface-t1"  # folder with train.rec / train.idx / property and the val .bin files
config.num_classes = 93431
config.num_image = 5179510
config.margin_list = (1.0, 0.5, 0.0)  # ArcFace
config.fp16 = True
config.lr = 0.1                # for the global batch of 8 GPUs x batch_size (use lr_per_512 to rescale)
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
