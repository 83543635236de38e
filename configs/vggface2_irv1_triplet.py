"""FaceNet (Schroff et al. 2015) on VGGFace2: inception_resnet_v1 at 160x160, 512-d embeddings, trained
with the semi-hard triplet loss (margin 0.2, squared distances) on P x K batches, no classifier.

Data: ``rec`` must be the image folder written by ``tools/detect_faces.py --mode facenet`` from the
VGGFace2 training images (MTCNN crops at 160x160 with facenet-pytorch's margin, one sub-folder per
identity), e.g.
    python tools/detect_faces.py --mode facenet /data/vggface2/train /data/vggface2_train_mtcnn160
    torchrun --nproc_per_node=8 train.py configs/vggface2_irv1_triplet.py
Batches: 8 ranks x 240 = 1920 faces = 48 identities x K=40 (FaceNet: about 40 faces per identity in a
~1800-face batch), whole identities per rank (6 each); the mining sees the global batch.
Optimiser settings are a starting point, not a measured recipe. Verification: ``val_data_dir`` should
hold an lfw.bin cropped the same way (tools/detect_faces.py --mode facenet on LFW, then tools/make_bin.py).
"""
from easydict import EasyDict as edict

config = edict()
config.network = "inception_resnet_v1"
config.image_size = (160, 160)
config.embedding_size = 512
config.rec = "/data/vggface2_train_mtcnn160"   # tools/detect_faces.py --mode facenet output
config.loss = "triplet"
config.triplet_margin = 0.2
config.triplet_mining = "semihard"
config.triplet_squared = True
config.sampler = "pk"
config.images_per_identity = 40
config.batch_size = 240          # per rank: 6 identities x 40
config.optimizer = "adam"
config.lr = 1e-3
config.weight_decay = 0.0
config.num_epoch = 20
config.warmup_epoch = 1
config.fp16 = True
config.val_data_dir = "/data/facenet_val"      # lfw.bin from MTCNN (facenet mode) crops
config.val_targets = ["lfw"]
