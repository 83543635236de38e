"""The README's demo: a small face model trained on CPU in a few minutes.

Generates an identity set once (cached under data_cache/), trains a tiny CNN with
a CosFace head on it, and verifies on pairs of identities never seen in training.
    python train.py configs/demo_cpu.py
    torchrun --nproc_per_node=2 train.py configs/demo_cpu.py
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
config.network = "tiny"          # ~20 MMAC CNN: MobileFaceNet is 20x the cost on a CPU
config.embedding_size = 128
config.num_workers = 1
config.margin_list = (1.0, 0.0, 0.35)  # CosFace: converges fast from scratch
config.scale = 32.0
config.batch_size = 64
config.lr = 0.1
config.weight_decay = 5e-4
config.num_epoch = 6
config.warmup_epoch = 0.5
config.frequent = 25
config.verbose = 150
config.val_targets = ["synthetic_unseen"]
config.verify_at_start = True
config.save_every_steps = 0
config.keep_checkpoints = 1
