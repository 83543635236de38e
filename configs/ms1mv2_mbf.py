"""ArcFace MobileFaceNet on MS1MV2 (mirrors arcface_torch's configs/ms1mv2_mbf.py). Layered over configs/base.py."""
from easydict import EasyDict as edict

config = edict()
config.network = "mbf"
config.rec = "/train_tmp/faces_emore"  # folder with train.rec / train.idx / property and the val .bin files
config.num_classes = 85742
config.num_image = 5822653
config.margin_list = (1.0, 0.5, 0.0)  # ArcFace
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.optimizer = "sgd"
config.batch_size = 128        # per GPU
config.lr = 0.1                # for the global batch of 8 GPUs x batch_size (use lr_per_512 to rescale)
config.momentum = 0.9
config.weight_decay = 1e-4
config.num_epoch = 40
config.warmup_epoch = 0
config.verbose = 2000
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
