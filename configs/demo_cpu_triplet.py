"""The CPU demo trained with the FaceNet triplet loss instead of a classifier head.

Same generated identity set as configs/demo_cpu.py (cached under data_cache/, built once) and the
same tiny CNN; every global batch holds P = 16 identities x K = 4 images (sampler "pk"), and the
loss mines triplets inside it. Verified on pairs of identities never seen in training.
    python train.py configs/demo_cpu_triplet.py
"""
from easydict import EasyDict as edict

config = edict()
config.device = "cpu"
config.seed = 0
config.synthetic = dict(
    num_identities=200,
    images_per_identity=24,
    num_val_identities=60,
    num_val_pairs=600,
)
config.network = "tiny"
config.embedding_size = 128
config.num_workers = 1
config.loss = "triplet"
config.triplet_margin = 0.2
config.triplet_mining = "semihard"
config.sampler = "pk"
config.images_per_identity = 4
config.batch_size = 64
config.optimizer = "sgd"
config.lr = 0.1
config.weight_decay = 5e-4
config.num_epoch = 3
config.warmup_epoch = 0.5
config.frequent = 25
config.verbose = 75
config.val_targets = ["synthetic_unseen"]
config.verify_at_start = True
config.save_every_steps = 0
config.keep_checkpoints = 1
