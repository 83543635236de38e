"""Fine-tune a released model on your own identities (an image folder), with fine-tuning's keys:

- ``init_backbone = "facenet:vggface2"``: facenet-pytorch's VGGFace2 inception_resnet_v1, downloaded once
  into $ARCSCALE_CACHE (docs/weights.md; a path to any backbone file works the same);
- a fresh CosFace head (Partial FC) for the new identities;
- ``head_only_epochs = 1``: the first epoch trains the head alone on the released embeddings (the backbone
  frozen: no gradients, BatchNorm statistics unchanged), so a random head does not push noise into it;
- ``freeze_bn = True``: BatchNorm keeps the statistics learnt on VGGFace2 (small batches of a few
  identities estimate them badly);
- ``freeze_stages = 1``: the convolutional stem stays as released;
- ``backbone_lr_scale = 0.1``: the backbone learns at a tenth of the head's rate.

Data: an image folder of MTCNN crops at 160x160, made as configs/vggface2_irv1_finetune.py says, then
``python train.py configs/finetune_folder_example.py --set rec=/data/my_faces_mtcnn160``.
"""
from easydict import EasyDict as edict

config = edict()
config.network = "inception_resnet_v1"
config.image_size = (160, 160)
config.embedding_size = 512
config.init_backbone = "facenet:vggface2"
config.rec = "/data/my_faces_mtcnn160"
config.margin_list = (1.0, 0.0, 0.35)       # CosFace
config.scale = 32.0
config.head_only_epochs = 1
config.freeze_bn = True
config.freeze_stages = 1
config.backbone_lr_scale = 0.1
config.optimizer = "sgd"
config.lr = 0.05
config.weight_decay = 5e-4
config.warmup_epoch = 0
config.num_epoch = 10
config.batch_size = 32
config.val_targets = []
