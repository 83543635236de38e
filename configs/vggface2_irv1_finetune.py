"""facenet-pytorch's fine-tuning recipe: start from its VGGFace2-trained inception_resnet_v1
(``facenet:vggface2``: downloaded once into the cache, docs/weights.md; 160x160 input, 512-d embeddings) and train a plain softmax classifier (linear layer
with bias + cross-entropy, ``head="softmax"``) on your identities: Adam, lr 1e-3, MultiStepLR at
epochs 5 and 10 (x0.1), 8 epochs, batch 32.

Data: ``rec`` must be the image folder written by ``tools/detect_faces.py --mode facenet`` (MTCNN crops
at 160x160, one sub-folder per identity), e.g.
    python tools/detect_faces.py --mode facenet /data/my_faces /data/my_faces_mtcnn160
    python train.py configs/vggface2_irv1_finetune.py --set rec=/data/my_faces_mtcnn160
"""
from easydict import EasyDict as edict

config = edict()
config.network = "inception_resnet_v1"
config.image_size = (160, 160)
config.embedding_size = 512
config.dropout = 0.6                        # facenet-pytorch InceptionResnetV1(dropout_prob=0.6)
config.init_backbone = "facenet:vggface2"   # facenet-pytorch's 20180402-114759-vggface2.pt (docs/weights.md)
config.rec = "/data/my_faces_mtcnn160"      # tools/detect_faces.py --mode facenet output
config.head = "softmax"
config.optimizer = "adam"
config.lr = 1e-3
config.weight_decay = 0.0                   # facenet-pytorch: optim.Adam(params, lr=0.001)
config.lr_schedule = "step"
config.lr_steps = [5, 10]                   # epochs (MultiStepLR([5, 10]), gamma 0.1)
config.lr_gamma = 0.1
config.warmup_epoch = 0
config.num_epoch = 8
config.batch_size = 32
config.clip_grad_norm = 0.0                 # the recipe does not clip
config.val_targets = []
