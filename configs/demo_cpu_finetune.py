"""The CPU demo's fine-tuning counterpart (docs/benchmarks.md, "Fine-tuning on CPU"): start from the demo's
trained backbone (configs/demo_cpu.py's model.pt) and train on identities it never saw: the same generator
with another seed (seed=1: other training identities and other unseen verification identities), fewer of
them. Compare with the same config trained from scratch (--set init_backbone=None --set head_only_epochs=0).
    python train.py configs/demo_cpu.py --set max_steps=100
    python train.py configs/demo_cpu_finetune.py --set init_backbone=work_dirs/demo_cpu/model.pt
"""
from easydict import EasyDict as edict

config = edict()
config.device = "cpu"
config.seed = 1                          # another identity set than demo_cpu.py's seed 0
config.synthetic = dict(num_identities=60, images_per_identity=12, num_val_identities=60, num_val_pairs=300)
config.network = "tiny"
config.embedding_size = 128
config.init_backbone = "work_dirs/demo_cpu/model.pt"
config.head_only_epochs = 1              # a fresh head for 60 new identities learns on the trained embeddings first
config.backbone_lr_scale = 0.5
config.num_workers = 1
config.margin_list = (1.0, 0.0, 0.35)
config.scale = 32.0
config.batch_size = 64
config.lr = 0.1
config.weight_decay = 5e-4
config.num_epoch = 6                     # 720 images: 11 steps per epoch
config.warmup_epoch = 0.5
config.frequent = 11
config.verbose = 11
config.val_targets = ["synthetic_unseen"]
config.verify_at_start = True
config.save_every_steps = 0
config.keep_checkpoints = 1
